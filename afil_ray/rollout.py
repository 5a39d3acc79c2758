"""Closed-loop rollouts of a chunked policy through the env layer.

Each env keeps a queue of actions from its last sampled chunk; whenever envs' queues run dry (an episode just
started, or ``execute_steps`` actions were executed) the policy samples fresh chunks for exactly those envs in
one batch. Every re-planning point keeps the whole sampled chunk and the sampler's diagnostics besides the
executed actions, because a failure head trained only on executed actions stitched from different samples
fits far worse than one trained on whole sampled chunks.

Sampling noise comes either from one shared ``generator`` (the default: an episode's noise then depends on its env
slot and on what the other envs sampled before) or, with ``noise_seed``, from one generator per episode: when an
env starts an episode, ``noise_seed(episode seed)`` seeds that env's own ``torch.Generator`` and every chunk of the
episode draws its initial noise from it, so the noise is a function of the episode alone (evaluation pairs arms
this way). Episodes for which ``noise_seed`` returns None draw from the shared generator.

With ``keep_images=False`` (an evaluation that keeps outcomes, not frames) the envs are asked to render only the
observations a chunk is sampled from, one in ``execute_steps``: most of a rendered step's cost on a CPU simulator
(LIBERO) is the rendering, and the observations in between are never shown to the policy.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from afil_ray.config import SamplerConfig
from afil_ray.envs.base import Obs, VecEnv
from afil_ray.envs.collector import EpisodeCollector
from afil_ray.envs.tasks import Instruct, canonical_instruction
from afil_ray.replay.episode import Episode


class ChunkPolicy(Protocol):
    def sample(self, obs: Obs, instructions: list[str], sampler: SamplerConfig, generator: Any = None
               ) -> tuple[np.ndarray, dict[str, Any]]:
        """Action chunks [B, H, A] in env units, and diagnostics (``w``, ``cos``: [B, K] when guided).

        Per-episode noise (``ChunkedRollout(noise_seed=...)``) also needs a ``noise_shape`` attribute (H, A) and a
        ``noise`` keyword ([B, H, A] initial noise used instead of ``generator``), as ``DAGPolicy`` has.
        """
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


def draw_noise(shape: tuple[int, ...], sampler: SamplerConfig, generator: torch.Generator | None) -> torch.Tensor:
    """One state's initial noise: ``shape`` (the policy's ``noise_shape``), or [K, *shape] for ``rank``'s K
    candidates, drawn as K draws in a row, so candidate 0 is the draw success only makes and K = 1 is its noise."""
    if sampler.kind != "rank":
        return torch.randn(shape, generator=generator)
    return torch.stack([torch.randn(shape, generator=generator) for _ in range(sampler.candidates)])


class ChunkedRollout:
    """Drives ``env`` with ``policy``: samples chunks, executes ``execute_steps`` of each, returns episodes."""

    def __init__(self, env: VecEnv, policy: ChunkPolicy, sampler: SamplerConfig, seeds: Iterator[int], *,
                 source: str = "policy", policy_version: int = -1, generator: Any = None,
                 noise_seed: Callable[[int], int | None] | None = None, instruct: Instruct = canonical_instruction,
                 observe: Callable[[Obs], Obs] | None = None, keep_images: bool = True,
                 monitor: Callable[[Obs, list[str], np.ndarray], np.ndarray] | None = None) -> None:
        self.env, self.policy, self.sampler = env, policy, sampler
        # a runtime failure monitor (afil_ray/detect/monitor.py): scores each re-planning state and the chunk sampled
        # there (before it runs), kept per episode
        self.monitor = monitor
        self.observe = observe  # what the policy is shown of an observation (an evaluation probe's view), if not all
        self.generator = generator
        self.noise_seed = noise_seed
        if noise_seed is not None and getattr(policy, "noise_shape", None) is None:
            raise TypeError("per-episode noise (noise_seed) needs a policy with noise_shape and sample(noise=...)")
        self._episode_generators: list[torch.Generator | None] = [None] * env.num_envs
        self._fallback_generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.collector = EpisodeCollector(
            env, seeds, source=source, policy_version=policy_version, sampler=sampler.kind,
            sampler_params=sampler.params(), instruct=instruct, keep_images=keep_images)
        self.queues: list[deque[np.ndarray]] = [deque() for _ in range(env.num_envs)]
        self.stats = RolloutStats()
        self.obs = self.collector.reset()
        for i in range(env.num_envs):
            self._start_noise(i)

    def set_policy(self, policy: ChunkPolicy, version: int) -> None:
        """Swap weights between chunks (on-policy refresh); episodes record the version they started with."""
        self.policy = policy
        self.collector.policy_version = version

    def _start_noise(self, i: int) -> None:
        """Seed env ``i``'s noise generator for the episode it just started (per-episode noise only)."""
        if self.noise_seed is None:
            return
        seed = self.noise_seed(self.collector.episode_seed(i))
        self._episode_generators[i] = None if seed is None else torch.Generator().manual_seed(int(seed))

    def _replan(self, idx: np.ndarray) -> None:
        obs = {k: v[idx] for k, v in self.obs.items()}
        if self.observe is not None:
            obs = self.observe(obs)
        instructions = [self.collector.instruction(int(i)) for i in idx]
        if self.noise_seed is None:
            actions, diag = self.policy.sample(obs, instructions, self.sampler, self.generator)
        else:
            shape = tuple(self.policy.noise_shape)  # type: ignore[attr-defined]
            noise = torch.stack([draw_noise(shape, self.sampler, self._episode_generators[i]
                                            or self._fallback_generator) for i in idx])
            actions, diag = self.policy.sample(obs, instructions, self.sampler, noise=noise)  # type: ignore[call-arg]
        w, cos = diag.get("w"), diag.get("cos")
        self.stats.chunks += len(idx)
        if w is not None:
            self.stats.w.append(float(np.mean(w)))
        if cos is not None:
            self.stats.cos.append(float(np.mean(cos)))
        scores = None if self.monitor is None else self.monitor(obs, instructions, actions)
        for j, i in enumerate(idx):
            if scores is not None:
                self.collector.add_failure_score(int(i), float(scores[j]))
            self.queues[i] = deque(actions[j, : self.sampler.execute_steps])
            self.collector.add_chunk(int(i), actions[j], None if w is None else w[j], None if cos is None else cos[j])

    def step(self) -> list[Episode]:
        """One env step for every env; returns the episodes that finished (their envs start new ones)."""
        empty = np.array([not q for q in self.queues])
        if empty.any():
            self._replan(np.flatnonzero(empty))
        actions = np.stack([q.popleft() for q in self.queues]).astype(np.float32)
        # the envs that re-plan at the next step read its images (a finished episode's reset renders anyway)
        render = None if self.collector.keep_images else np.array([not q for q in self.queues])
        self.obs, finished = self.collector.step(actions, render)
        for i in np.flatnonzero(self.collector.last_done):
            self.queues[i].clear()  # a new episode re-plans from its first observation
            self._start_noise(int(i))
        self.stats.env_steps += self.env.num_envs
        self.stats.episodes += len(finished)
        self.stats.successes += sum(ep.success for ep in finished)
        return finished
