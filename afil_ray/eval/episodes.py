"""Running evaluation episodes: which episodes an arm runs and where their sampling noise comes from.

An evaluation episode is a pair ``(seed, run)``: the seed (``eval.seed_start .. seed_start + episodes - 1``) fixes
the initial state, the run index (``0 .. eval.runs - 1``) the sampling noise. Each episode's noise comes from its
own ``torch.Generator``, seeded from ``(seed, run, cfg.seed)`` when the episode starts, and every re-planning of
that episode draws its chunk's initial noise from it, so the noise depends on the episode alone: not on the env
slot it ran in, not on other episodes, not on the arm. Every arm (``eval.arms``) runs the same ``(seed, run)``
set, so arms pair up episode by episode (``afil_ray.eval.report`` compares them with an exact McNemar test and a
paired bootstrap).

What pairing covers: both samplers are deterministic once the initial noise is drawn (flow: Euler steps; ddpm:
DDIM with eta = 0), so the initial noise is all of the sampling randomness and it is shared exactly. Two arms
whose chunks differ drive the env into different states, after which their later chunks see different
observations (and batch compositions); that is the effect being measured, not a pairing leak. With the guided
heads run as two calls (``eval.exact_pairing``), ``static`` with w = 0 and ``adaptive`` with lam = 0 reproduce
``success_only`` bit for bit (same chunks, actions and outcomes). The env must reset deterministically per seed
whatever its slot (true for ManiSkill's CPU envs; batched GPU physics is not checked here).

The evaluated episodes are exactly the seeded ones (not the first N to finish, which would favour short,
successful episodes). Envs that run out of evaluation seeds keep stepping on throw-away seeds (with noise from a
shared generator) until the last evaluated episode ends.

Each episode records ``success_once`` (successful at some step, ``Episode.success``) and ``success_at_end``
(successful at its last step); ``eval.metric`` picks the one reported. With ``env.ignore_terminations`` false
(the default) an episode ends at its first success, so the two coincide; set it true to tell them apart.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from afil_ray.config import Config
from afil_ray.envs.base import VecEnv
from afil_ray.eval.arms import Arm
from afil_ray.eval.probes import probe_inputs
from afil_ray.eval.report import EpisodeOutcome
from afil_ray.replay.episode import Episode
from afil_ray.rollout import ChunkedRollout, ChunkPolicy


@dataclass
class EvalResult:
    """One arm's evaluated episodes on one task."""

    task: str
    arm: Arm
    episodes: list[Episode]  # ordered by (run, seed); ``extra`` holds ``eval_run`` and ``noise_seed``
    metric: str = "success_once"

    def outcome(self, ep: Episode) -> bool:
        return bool(ep.success) if self.metric == "success_once" else success_at_end(ep)

    @property
    def successes(self) -> int:
        return sum(self.outcome(e) for e in self.episodes)

    @property
    def success_rate(self) -> float:
        return self.successes / len(self.episodes) if self.episodes else 0.0

    def summary(self) -> str:
        return (f"{self.task} sampler={self.arm.name}: success {self.successes}/{len(self.episodes)} = "
                f"{self.success_rate:.3f}")

    def outcomes(self) -> list[EpisodeOutcome]:
        return [EpisodeOutcome(seed=e.seed, run=int(e.extra["eval_run"]), success_once=bool(e.success),
                               success_at_end=success_at_end(e)) for e in self.episodes]


def success_at_end(ep: Episode) -> bool:
    """Successful at the last step (the collector records it in ``extra``)."""
    return bool(ep.extra.get("success_at_end", False))


def episode_noise_seed(seed: int, run: int, base_seed: int) -> int:
    """The noise seed of evaluation episode ``(seed, run)`` under ``cfg.seed = base_seed`` (63 bits)."""
    entropy = [int(base_seed) % 2**64, int(run) % 2**64, int(seed) % 2**64]
    return int(np.random.SeedSequence(entropy).generate_state(1, np.uint64)[0]) >> 1


def run_episodes(env: VecEnv, cfg: Config, policy: ChunkPolicy, arm: Arm, run: int,
                 bar: tqdm | None = None, keep_snapshots: bool = False) -> list[Episode]:
    """Episodes ``(seed, run)`` for the seeds of ``cfg.eval`` with ``arm`` (its sampler, and its probe's view and
    instruction), ordered by seed. ``keep_snapshots`` keeps the episodes whole, simulator snapshots and every camera
    frame: a harvest stores them and corrects its failures from the snapshots. A report needs outcomes only, so
    without it the envs render only the frames the policy samples from (:class:`ChunkedRollout`)."""
    n, s0 = cfg.eval.episodes, cfg.eval.seed_start
    wanted = range(s0, s0 + n)

    def noise_seed(seed: int) -> int | None:
        return episode_noise_seed(seed, run, cfg.seed) if seed in wanted else None

    instruct, observe = probe_inputs(arm.probe, arm.foils, cfg.env.paraphrase)
    rollout = ChunkedRollout(env, policy, arm.sampler, itertools.count(s0), source="eval",
                             generator=torch.Generator().manual_seed(cfg.seed), noise_seed=noise_seed,
                             instruct=instruct, observe=observe, keep_images=keep_snapshots)
    kept: list[Episode] = []
    while len(kept) < n:
        for ep in rollout.step():
            if ep.seed in wanted:
                ep.extra.update(eval_run=run, noise_seed=episode_noise_seed(ep.seed, run, cfg.seed))
                if not keep_snapshots:
                    ep.snapshot_steps, ep.snapshots = [], []  # keeps worker replies small
                kept.append(ep)
                if bar is not None:
                    bar.update(1)
    kept.sort(key=lambda e: e.seed)
    return kept
