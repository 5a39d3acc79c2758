"""N single-scene envs stepped one after the other in this process: the cheapest vectorisation, shared by the
simulator adapters whose single envs speak one small protocol (``reset(seed)``, ``step(action)`` and
``restore_from``, each info carrying ``success``, ``fail``, ``elapsed_steps`` and ``snapshot``; a
``render_next`` attribute, when False, lets the next step's observation skip rendering its cameras)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from afil_ray.envs.base import Obs, StepResult


class LoopBatch:
    """The envs ``make(i)`` builds for i < ``num_envs`` (the ones built so far are closed if one fails)."""

    mode = "loop"

    def __init__(self, make: Callable[[int], Any], num_envs: int) -> None:
        self.envs: list[Any] = []
        try:
            for i in range(num_envs):
                self.envs.append(make(i))
        except BaseException:
            self.close()
            raise
        self.n = num_envs
        self._last: list[Obs] = [{} for _ in range(num_envs)]

    def _batch(self) -> Obs:
        return {k: np.stack([o[k] for o in self._last]) for k in self._last[0]}

    def reset(self, seeds: Sequence[int], mask: np.ndarray | None) -> tuple[Obs, list[bytes | None]]:
        snaps: list[bytes | None] = [None] * self.n
        for i, env in enumerate(self.envs):
            if mask is None or mask[i]:
                self._last[i], info = env.reset(seed=int(seeds[i]))
                snaps[i] = info["snapshot"]
        return self._batch(), snaps

    def step(self, actions: np.ndarray, render: np.ndarray | None = None) -> StepResult:
        if render is not None:  # each env goes back to rendering after its step
            for env, on in zip(self.envs, render, strict=True):
                env.render_next = bool(on)
        out = [env.step(a) for env, a in zip(self.envs, actions, strict=True)]
        self._last = [o[0] for o in out]
        infos = [o[4] for o in out]
        return StepResult(
            obs=self._batch(), reward=np.array([o[1] for o in out], np.float32),
            terminated=np.array([o[2] for o in out]), truncated=np.array([o[3] for o in out]),
            success=np.array([i["success"] for i in infos]), fail=np.array([i["fail"] for i in infos]),
            elapsed_steps=np.array([i["elapsed_steps"] for i in infos], np.int64),
            snapshots=[i["snapshot"] for i in infos],
        )

    def restore(self, index: int, snapshot: bytes, step: int) -> Obs:
        obs = self.envs[index].restore_from({index: (snapshot, step)})
        assert obs is not None
        self._last[index] = obs
        return obs

    def close(self) -> None:
        for env in self.envs:
            env.close()
