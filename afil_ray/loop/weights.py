"""Weight versions as the loop ships them: only the components that changed, as numpy arrays.

Numpy arrays go through Ray's object store zero-copy (readers on the same node map the same memory), and a
packet is ``ray.put`` once per version however many actors read it. Applying a packet checks every key and
shape (``checkpoint.load_component_state``), so an actor never runs half-loaded weights.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from afil_ray.config import Config
from afil_ray.policy.checkpoint import load_component_state
from afil_ray.policy.loading import load_start_policy, resolve_device
from afil_ray.policy.model import DAGPolicy


def actor_policy(cfg: Config) -> DAGPolicy:
    """The policy an actor of the loop acts with until the first version arrives: ``loop.init_from`` (with the
    critic or outcome tokens the config asks for), on ``loop.torch_threads`` threads, in eval mode."""
    if not cfg.loop.init_from:
        raise ValueError("loop.init_from must name the checkpoint the loop starts from (a success-only one)")
    if cfg.loop.torch_threads:
        torch.set_num_threads(cfg.loop.torch_threads)
    policy = load_start_policy(cfg.loop.init_from, resolve_device(cfg.train.device), critic=cfg.policy,
                               seed=cfg.seed)
    return policy.eval()


@dataclass
class WeightPacket:
    """One published weight version: ``components`` maps a component name to its state dict (numpy)."""

    version: int
    components: dict[str, dict[str, np.ndarray]]
    learner_step: int = 0
    published_at: float = field(default_factory=time.time)  # wall clock, for publish-to-applied latency

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for state in self.components.values() for a in state.values())


def pack(policy: DAGPolicy, components: Sequence[str], version: int, learner_step: int = 0) -> WeightPacket:
    """Copy ``components`` of ``policy`` to CPU numpy (detached from the learner's live tensors)."""
    unknown = [c for c in components if c not in policy.components]
    if unknown:
        raise ValueError(f"unknown component {unknown[0]!r}; this policy's components are {policy.components}")
    state = {name: {k: v.detach().to("cpu", copy=True).numpy() for k, v in policy.component(name).state_dict().items()}
             for name in components}
    return WeightPacket(version=version, components=state, learner_step=learner_step)


def apply(policy: DAGPolicy, packet: WeightPacket) -> None:
    """Load every component of ``packet`` into ``policy`` (checked keys and shapes)."""
    device = policy.device
    for name, state in packet.components.items():
        tensors = {k: torch.from_numpy(np.array(v, copy=True)).to(device) for k, v in state.items()}
        load_component_state(policy, name, tensors, source=f"weight version {packet.version}")
