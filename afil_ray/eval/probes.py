"""Evaluation probes: arms that change what the policy is shown or told, to measure what it relies on.

A policy that sees and reads should fail when its cameras go dark (``blank_cameras``: every image black, state
and instruction untouched) and when it is told another task (``other_instruction``: the next task's training
phrasing in the evaluated task list, e.g. PushCube's episodes read a PullCube instruction), and hold up when it is
told its own task in words it never trained on (``heldout_phrasing``, TaskSpec.heldout). Probes are arms of the
paired protocol, so each is compared episode by episode with the unprobed arm on the same seeds and noise.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from afil_ray.config import ConfigError
from afil_ray.envs.base import Obs
from afil_ray.envs.tasks import Instruct, TaskSpec, episode_instruction, get_task
from afil_ray.replay.episode import IMAGE_PREFIX

PROBES = ("blank_cameras", "other_instruction", "heldout_phrasing")


def check_probe(probe: str, spec: str) -> None:
    if probe not in PROBES:
        raise ConfigError(f"eval.arms: unknown probe {probe!r} in arm {spec!r}; probes: {', '.join(PROBES)}")


def blank_cameras(obs: Obs) -> Obs:
    """The observation with every camera image black."""
    return {k: np.zeros_like(v) if k.startswith(IMAGE_PREFIX) else v for k, v in obs.items()}


def foil(task: TaskSpec, foils: tuple[str, ...]) -> TaskSpec:
    """The task whose instruction ``task``'s episodes read under ``other_instruction``: the next in ``foils``."""
    if task.env_id not in foils or len(foils) < 2:
        raise ConfigError(f"eval.arms: @other_instruction needs the evaluated tasks to be two or more including "
                          f"{task.env_id}, got {', '.join(foils) or 'none'}")
    return get_task(foils[(foils.index(task.env_id) + 1) % len(foils)])


def _heldout(task: TaskSpec, seed: int) -> str:
    if not task.heldout:
        raise ConfigError(f"eval.arms: @heldout_phrasing: task {task.env_id} has no held-out phrasings "
                          "(TaskSpec.heldout in afil_ray/envs/tasks.py)")
    return task.heldout_phrasing(seed)


def probe_inputs(probe: str, foils: tuple[str, ...], paraphrase: bool
                 ) -> tuple[Instruct, Callable[[Obs], Obs] | None]:
    """(what each episode reads, what the policy is shown of each observation) under ``probe``."""
    own = episode_instruction(paraphrase)
    if probe == "":
        return own, None
    if probe == "blank_cameras":
        return own, blank_cameras
    if probe == "other_instruction":
        return (lambda task, seed: own(foil(task, foils), seed)), None
    if probe == "heldout_phrasing":
        return _heldout, None
    check_probe(probe, probe)
    raise AssertionError(probe)
