"""``afil-ray eval`` (minimal form): N fresh-seed episodes of a checkpoint with a chosen sampler.

The evaluated episodes are exactly those with seeds ``eval.seed_start .. seed_start + N - 1`` (not the first N
to finish, which would favour short, successful episodes). Envs that run out of evaluation seeds keep stepping
on throw-away seeds until the last evaluated episode ends.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from tqdm import tqdm

from afil_ray.config import Config
from afil_ray.envs.maniskill import ManiSkillVecEnv
from afil_ray.replay.episode import Episode
from afil_ray.rollout import ChunkedRollout, ChunkPolicy


@dataclass
class EvalResult:
    task: str
    sampler: str
    episodes: list[Episode]

    @property
    def success_rate(self) -> float:
        return sum(e.success for e in self.episodes) / len(self.episodes) if self.episodes else 0.0

    def summary(self) -> str:
        n = len(self.episodes)
        k = sum(e.success for e in self.episodes)
        return f"{self.task} sampler={self.sampler}: success {k}/{n} = {self.success_rate:.3f}"


def evaluate(cfg: Config, policy: ChunkPolicy, progress: bool = True) -> EvalResult:
    n, s0 = cfg.eval.episodes, cfg.eval.seed_start
    wanted = set(range(s0, s0 + n))
    seeds = itertools.count(s0)
    generator = torch.Generator().manual_seed(cfg.seed)
    kept: list[Episode] = []
    with ManiSkillVecEnv(cfg.env) as env:
        rollout = ChunkedRollout(env, policy, cfg.sampler, seeds, source="eval", generator=generator)
        with tqdm(total=n, desc=f"eval {cfg.env.task} {cfg.sampler.kind}", unit="ep", disable=not progress,
                  dynamic_ncols=True) as bar:
            while len(kept) < n:
                for ep in rollout.step():
                    if ep.seed in wanted:
                        kept.append(ep)
                        bar.update(1)
                        bar.set_postfix(success=f"{sum(e.success for e in kept) / len(kept):.2f}")
    kept.sort(key=lambda e: e.seed)
    return EvalResult(cfg.env.task, cfg.sampler.kind, kept)
