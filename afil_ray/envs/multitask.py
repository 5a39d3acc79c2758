"""Several tasks' vectorized envs behind one VecEnv, so one policy acts in all of them in one batch.

Slots are laid out task by task (the first env's slots, then the second's, ...); each slot keeps its task for the
env's life, and ``slot_tasks`` says which it is. The tasks must look the same to a policy: one state layout, the
same cameras and the same action space (checked here, with a one-line error naming the two tasks that differ),
since nothing but the instruction is supposed to tell them apart.
"""

from __future__ import annotations

import numpy as np

from afil_ray.config import ConfigError
from afil_ray.envs.base import Obs, StepResult, VecEnv
from afil_ray.envs.tasks import TaskSpec


def _signature(env: VecEnv) -> dict[str, object]:
    return {"state size": env.state_dim, "cameras": tuple(env.cameras), "action size": env.action_dim,
            "control mode": env.control_mode, "observation mode": env.obs_mode}


def check_alike(envs: list[VecEnv]) -> None:
    """ConfigError naming the first two tasks whose observations or actions differ."""
    first = envs[0]
    for env in envs[1:]:
        for what, value in _signature(env).items():
            if value != _signature(first)[what]:
                hint = " (name the cameras they share in env.cameras)" if what == "cameras" else ""
                raise ConfigError(f"env.task: {first.slot_tasks[0].env_id} and {env.slot_tasks[0].env_id} differ in "
                                  f"{what} ({_signature(first)[what]} vs {value}); one policy needs them alike{hint}")
    low, high = getattr(first, "action_low", None), getattr(first, "action_high", None)
    for env in envs[1:]:
        if low is not None and not (np.allclose(low, env.action_low) and np.allclose(high, env.action_high)):
            raise ConfigError(f"env.task: {first.slot_tasks[0].env_id} and {env.slot_tasks[0].env_id} differ in "
                              "action bounds; one policy needs one action space")


class MultiTaskVecEnv:
    """The slots of several VecEnvs (one per task) as one VecEnv; closing it closes them all."""

    def __init__(self, envs: list[VecEnv]) -> None:
        if not envs:
            raise ValueError("MultiTaskVecEnv needs at least one env")
        try:
            check_alike(envs)
        except ConfigError:
            for env in envs:
                env.close()
            raise
        self.envs = envs
        first = envs[0]
        self.slot_tasks: tuple[TaskSpec, ...] = tuple(t for env in envs for t in env.slot_tasks)
        self.num_envs = len(self.slot_tasks)
        self.obs_mode, self.control_mode = first.obs_mode, first.control_mode
        self.state_dim, self.action_dim, self.cameras = first.state_dim, first.action_dim, tuple(first.cameras)
        self.max_episode_steps = max(env.max_episode_steps for env in envs)
        self.snapshot_every = first.snapshot_every
        self.action_low, self.action_high = getattr(first, "action_low", None), getattr(first, "action_high", None)
        self._starts = np.cumsum([0] + [env.num_envs for env in envs])
        self._parts = [slice(int(a), int(b)) for a, b in zip(self._starts[:-1], self._starts[1:], strict=True)]
        self._last: list[Obs] = [{} for _ in envs]

    def _join(self) -> Obs:
        return {k: np.concatenate([obs[k] for obs in self._last]) for k in self._last[0]}

    def reset(self, seeds: list[int], mask: np.ndarray | None = None) -> tuple[Obs, list[bytes | None]]:
        if len(seeds) != self.num_envs:
            raise ValueError(f"reset needs one seed per env ({self.num_envs}), got {len(seeds)}")
        snaps: list[bytes | None] = [None] * self.num_envs
        for j, (env, part) in enumerate(zip(self.envs, self._parts, strict=True)):
            sub_mask = None if mask is None else np.asarray(mask, bool)[part]
            if sub_mask is not None and not sub_mask.any() and self._last[j]:
                continue
            self._last[j], sub_snaps = env.reset(list(seeds[part]), sub_mask if self._last[j] else None)
            snaps[part] = sub_snaps
        return self._join(), snaps

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        actions = np.asarray(actions, np.float32)
        pairs = list(zip(self.envs, self._parts, strict=True))

        def kw(part: slice) -> dict[str, np.ndarray]:  # the plain call for envs that render every step anyway
            return {} if render is None else {"render": np.asarray(render, bool)[part]}

        for env, part in pairs:  # every task's envs step at once where they run in processes
            if hasattr(env, "step_async"):
                env.step_async(actions[part], **kw(part))
        results = [env.step_wait() if hasattr(env, "step_async") else env.step(actions[part], **kw(part))
                   for env, part in pairs]
        self._last = [r.obs for r in results]

        def cat(name: str) -> np.ndarray:
            return np.concatenate([getattr(r, name) for r in results])

        return StepResult(obs=self._join(), reward=cat("reward"), terminated=cat("terminated"),
                          truncated=cat("truncated"), success=cat("success"), fail=cat("fail"),
                          elapsed_steps=cat("elapsed_steps"), snapshots=[s for r in results for s in r.snapshots])

    def _locate(self, index: int) -> tuple[int, int]:
        j = int(np.searchsorted(self._starts, index, side="right") - 1)
        return j, index - int(self._starts[j])

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        j, local = self._locate(index)
        obs = self.envs[j].restore(local, snapshot, step)
        for k, v in obs.items():
            self._last[j][k][local] = v
        return obs

    def close(self) -> None:
        for env in self.envs:
            env.close()

    def __enter__(self) -> MultiTaskVecEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
