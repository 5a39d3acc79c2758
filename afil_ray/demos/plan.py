"""What every demonstrator returns and offers, whichever simulator it drives (ManiSkill's motion planners,
LIBERO's scripted controller), so demos and corrections are made one way for all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from afil_ray.envs.base import VecEnv
from afil_ray.envs.tasks import TaskSpec


@dataclass
class Plan:
    """A demonstrator's run: its targets (one per step), and the first step (1-based) that reached success (0:
    none)."""

    targets: list[np.ndarray]
    first_success: int
    reason: str  # "ok" or why there is no usable plan


class Demonstrator(Protocol):
    """Plans a task's solution in a twin of the policy's scene, then turns each target into the policy's action."""

    spec: TaskSpec
    source: str  # what the demos it makes are stored as (Episode.source)

    def plan(self, seed: int, start_state: bytes | None = None) -> Plan:
        """Solve the episode of ``seed`` from its start, or from a stored snapshot of it."""
        ...

    def action(self, env: VecEnv, target: np.ndarray) -> np.ndarray:
        """The action in ``env``'s control mode that moves its env 0 towards ``target`` from where it is now."""
        ...

    def close(self) -> None: ...
