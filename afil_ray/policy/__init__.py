"""The DAG-VLA policy: shared VLM backbone, success and failure action heads, and failure-informed sampling.

``model.DAGPolicy`` is what trainers and actors hold; ``sampler.sample_chunk`` is the guided sampling loop;
``guidance`` is the AFIL rule itself; ``critic`` the optional success critic; ``checkpoint`` saves and loads it
per component.
"""

from afil_ray.policy.backbone import Backbone, Prefix
from afil_ray.policy.checkpoint import (
    CheckpointError,
    load_component,
    load_component_state,
    load_policy,
    save_component,
    save_policy,
)
from afil_ray.policy.critic import Critic
from afil_ray.policy.guidance import adaptive_weight, cosine, guide
from afil_ray.policy.heads import ActionHead
from afil_ray.policy.model import COMPONENTS, HEADS, OPTIONAL_COMPONENTS, DAGPolicy
from afil_ray.policy.normalize import Normalizer
from afil_ray.policy.sampler import HeadPair, sample_chunk

__all__ = [
    "COMPONENTS",
    "HEADS",
    "OPTIONAL_COMPONENTS",
    "ActionHead",
    "Backbone",
    "CheckpointError",
    "Critic",
    "DAGPolicy",
    "HeadPair",
    "Normalizer",
    "Prefix",
    "adaptive_weight",
    "cosine",
    "guide",
    "load_component",
    "load_component_state",
    "load_policy",
    "sample_chunk",
    "save_component",
    "save_policy",
]
