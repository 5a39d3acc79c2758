"""The one interface every simulator back-end implements, so rollout code never sees simulator specifics.

Observations are batched numpy dicts: ``state`` float32 [N, D] (the task state in ``state`` mode, proprioception
plus task extras in ``rgb`` mode) and one ``rgb_<camera>`` uint8 [N, H, W, 3] per camera in ``rgb`` mode.
Step infos carry ``success`` and ``fail`` [N] bool, ``elapsed_steps`` [N] int and ``snapshot`` [N] object
(serialised simulator state taken before the step it is recorded with, or None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

from afil_ray.envs.tasks import TaskSpec
from afil_ray.replay.episode import IMAGE_PREFIX

Obs = dict[str, np.ndarray]


class SimulatorError(RuntimeError):
    """The simulator crashed or misbehaved; the message names the task, back-end and env index."""


@dataclass
class StepResult:
    obs: Obs
    reward: np.ndarray  # [N] float32
    terminated: np.ndarray  # [N] bool: success or fail (unless terminations are ignored)
    truncated: np.ndarray  # [N] bool: the task's episode limit was reached
    success: np.ndarray  # [N] bool
    fail: np.ndarray  # [N] bool
    elapsed_steps: np.ndarray  # [N] int
    snapshots: list[bytes | None]  # state of each env at ``elapsed_steps`` (after this step), if taken

    @property
    def done(self) -> np.ndarray:
        return self.terminated | self.truncated


def describe_spaces(target: Any, obs_space: gym.spaces.Dict, act_space: gym.spaces.Box) -> None:
    """Set the VecEnv attributes that a single env's spaces determine (state size, cameras, action size and
    bounds) on ``target``, so every back-end reads them from its spaces the same way."""
    target.state_dim = int(obs_space["state"].shape[0])
    target.cameras = tuple(k[len(IMAGE_PREFIX):] for k in obs_space if k.startswith(IMAGE_PREFIX))
    target.action_dim = int(act_space.shape[0])
    target.action_low, target.action_high = act_space.low.copy(), act_space.high.copy()


class VecEnv(Protocol):
    slot_tasks: tuple[TaskSpec, ...]  # the task each env slot runs (one task for a single-task env)
    num_envs: int
    obs_mode: str
    control_mode: str
    state_dim: int
    action_dim: int
    cameras: tuple[str, ...]
    max_episode_steps: int
    snapshot_every: int

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> tuple[Obs, list[bytes | None]]:
        """Reset all envs (mask None) or those where mask is True, each with its own seed (len(seeds) == N)."""
        ...

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        """Step every env. ``render`` ([N] bool, None for all): the envs whose new observation must carry camera
        images; a back-end may leave the others' images black instead of rendering them (LIBERO does, ManiSkill
        renders them anyway). A reset or a restore always renders."""
        ...

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        """Put env ``index`` into a stored state; ``step`` becomes its elapsed-step counter. Returns its obs."""
        ...

    def close(self) -> None: ...
