"""Closed-loop rollouts of a chunked policy through the env layer.

Each env keeps a queue of actions from its last sampled chunk; whenever envs' queues run dry (an episode just
started, or ``execute_steps`` actions were executed) the policy samples fresh chunks for exactly those envs in
one batch. Every re-planning point keeps the whole sampled chunk and the sampler's diagnostics besides the
executed actions, because a failure head trained only on executed actions stitched from different samples
fits far worse than one trained on whole sampled chunks.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from afil_ray.config import SamplerConfig
from afil_ray.envs.base import Obs, VecEnv
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.replay.episode import Episode


class ChunkPolicy(Protocol):
    def sample(self, obs: Obs, instructions: list[str], sampler: SamplerConfig, generator: Any = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
        """Action chunks [B, H, A] in env units, and diagnostics (``w``, ``cos``: [B, K] when guided)."""
        ...


@dataclass
class RolloutStats:
    episodes: int = 0
    successes: int = 0
    env_steps: int = 0
    chunks: int = 0
    w: list[float] = field(default_factory=list)  # mean guidance weight per sampling call
    cos: list[float] = field(default_factory=list)

    @property
    def success_rate(self) -> float:
        return self.successes / self.episodes if self.episodes else 0.0


class ChunkedRollout:
    """Drives ``env`` with ``policy``: samples chunks, executes ``execute_steps`` of each, returns episodes."""

    def __init__(self, env: VecEnv, policy: ChunkPolicy, sampler: SamplerConfig, seeds: Iterator[int], *,
                 source: str = "policy", policy_version: int = -1, generator: Any = None) -> None:
        self.env, self.policy, self.sampler = env, policy, sampler
        self.generator = generator
        self.collector = EpisodeCollector(
            env, seeds, source=source, policy_version=policy_version, sampler=sampler.kind,
            sampler_params={"w": sampler.w, "lam": sampler.lam, "steps": sampler.steps,
                            "execute_steps": sampler.execute_steps})
        self.queues: list[deque[np.ndarray]] = [deque() for _ in range(env.num_envs)]
        self.stats = RolloutStats()
        self.obs = self.collector.reset()

    def set_policy(self, policy: ChunkPolicy, version: int) -> None:
        """Swap weights between chunks (on-policy refresh); episodes record the version they started with."""
        self.policy = policy
        self.collector.policy_version = version

    def _replan(self, idx: np.ndarray) -> None:
        obs = {k: v[idx] for k, v in self.obs.items()}
        actions, diag = self.policy.sample(obs, [self.env.task.instruction] * len(idx), self.sampler,
                                           self.generator)
        w, cos = diag.get("w"), diag.get("cos")
        self.stats.chunks += len(idx)
        if w is not None:
            self.stats.w.append(float(np.mean(w)))
        if cos is not None:
            self.stats.cos.append(float(np.mean(cos)))
        for j, i in enumerate(idx):
            self.queues[i] = deque(actions[j, : self.sampler.execute_steps])
            self.collector.add_chunk(int(i), actions[j], None if w is None else w[j], None if cos is None else cos[j])

    def step(self) -> list[Episode]:
        """One env step for every env; returns the episodes that finished (their envs start new ones)."""
        empty = np.array([not q for q in self.queues])
        if empty.any():
            self._replan(np.flatnonzero(empty))
        actions = np.stack([q.popleft() for q in self.queues]).astype(np.float32)
        self.obs, finished = self.collector.step(actions)
        for i in np.flatnonzero(self.collector.last_done):
            self.queues[i].clear()  # a new episode re-plans from its first observation
        self.stats.env_steps += self.env.num_envs
        self.stats.episodes += len(finished)
        self.stats.successes += sum(ep.success for ep in finished)
        return finished
