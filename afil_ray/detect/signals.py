"""Runtime failure scores: per state, how likely the running episode is to fail, from three things a policy has.

- ``critic``: 1 - V(s), the success critic's estimate (issue 22's critic, afil_ray/policy/critic.py);
- ``spread``: how much K chunks sampled from the success head for the same state disagree (the mean over the
  chunk of the per-dimension standard deviation, in normalised action units), FIPER's and FAIL-Detect's sign that
  the policy is off the data it knows;
- ``disagreement``: 1 - cos(v_s, v_f) of the success and failure heads, averaged over the integration steps (what
  the paper's adaptive rule already computes to set its weight);
- ``chosen``: 1 - Q(s, chunk) of the chunk the policy sampled to execute next. The others judge the state; this one
  judges the policy's choice in it, which V(s), the critic's average over the policy's choices, cannot see: where
  the outcome still depends on the action (the critic's within-state AUROC above 0.5), an unlucky draw shows here
  before its consequences reach the state. It is known before the chunk runs.

Higher is more alarming for each. A score is a function of the state (and fixed noise, and for ``chosen`` the
chunk, which every stored episode keeps at its re-planning steps), so scoring a stored episode replays exactly what
a monitor running beside the policy would have seen at its re-planning steps.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from tqdm import tqdm

from afil_ray.config import DETECT_SIGNALS, SamplerConfig
from afil_ray.policy.model import DAGPolicy
from afil_ray.replay.episode import Episode

SIGNALS = DETECT_SIGNALS
CRITIC_SIGNALS = ("critic", "chosen")  # the signals that read the success critic


class FailureSignals:
    """The scores of one policy for batches of observations."""

    def __init__(self, policy: DAGPolicy, sampler: SamplerConfig, k: int = 8, seed: int = 0,
                 signals: Sequence[str] = SIGNALS) -> None:
        unknown = [s for s in signals if s not in SIGNALS]
        if unknown:
            raise ValueError(f"unknown failure signal {unknown[0]!r}; signals: {', '.join(SIGNALS)}")
        needs_critic = [s for s in signals if s in CRITIC_SIGNALS]
        if needs_critic and policy.critic is None:
            raise ValueError(f"the {needs_critic[0]} signal needs a policy with a trained critic (train.mode=critic)")
        if k < 2:
            raise ValueError(f"the spread of sampled chunks needs k >= 2, got {k}")
        self.policy, self.k, self.seed, self.signals = policy, k, seed, tuple(signals)
        self.plain = dataclasses.replace(sampler, kind="success_only")
        self.paired = dataclasses.replace(sampler, kind="adaptive", lam=1.0)

    def _noise(self, batch: int, k: int) -> torch.Tensor:
        """The same noise for every call with the same batch shape: scores depend on states alone."""
        generator = torch.Generator().manual_seed(self.seed)
        return torch.randn((batch, k, *self.policy.noise_shape), generator=generator)

    @torch.no_grad()
    def __call__(self, obs: Mapping[str, np.ndarray], instructions: Sequence[str],
                 chunks: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """{signal: [B] scores} for env observations (``state`` and cameras), one instruction per row and, for
        ``chosen``, the chunk [B, H, A] (env units) the policy sampled for each."""
        batch = len(obs["state"])
        out: dict[str, np.ndarray] = {}
        if "critic" in self.signals:
            out["critic"] = 1.0 - self.policy.v(obs, list(instructions))
        if "chosen" in self.signals:
            if chunks is None:
                raise ValueError("the chosen signal scores the chunk the policy sampled: pass chunks")
            out["chosen"] = 1.0 - self.policy.q(obs, list(instructions), chunks)
        if "spread" in self.signals:
            wide = {key: np.repeat(value, self.k, axis=0) for key, value in obs.items()}
            candidates, _ = self.policy.sample(wide, [i for i in instructions for _ in range(self.k)], self.plain,
                                               noise=self._noise(batch, self.k).flatten(0, 1))
            normalised = self.policy.normalizer.normalize_action(torch.as_tensor(candidates, dtype=torch.float32,
                                                                                 device=self.policy.device))
            spread = normalised.view(batch, self.k, -1).std(dim=1, unbiased=False).mean(dim=1)
            out["spread"] = spread.float().cpu().numpy()
        if "disagreement" in self.signals:
            _, diagnostics = self.policy.sample(obs, list(instructions), self.paired,
                                                noise=self._noise(batch, 1)[:, 0])
            out["disagreement"] = 1.0 - diagnostics["cos"].mean(axis=1)
        return out


def scored_steps(episode: Episode, every: int) -> np.ndarray:
    """The steps a monitor scores: the episode's re-planning steps where it recorded them, else every ``every``."""
    steps = np.asarray(episode.chunk_steps, np.int64)
    return steps if len(steps) else np.arange(0, episode.length, every)


def hold(values: np.ndarray, steps: np.ndarray, length: int) -> np.ndarray:
    """Per-step scores [length] from scores at ``steps``: each holds until the next scored step (what a monitor
    that scores at re-planning knows at every step)."""
    out = np.empty(length, np.float64)
    starts = np.append(steps, length)
    for value, start, end in zip(values, starts[:-1], starts[1:], strict=True):
        out[start:end] = value
    if len(steps) and steps[0] > 0:
        out[: steps[0]] = values[0]
    return out


def score_episodes(signals: FailureSignals, episodes: Sequence[Episode], every: int,
                   batch_size: int = 256, progress: bool = False) -> list[dict[str, np.ndarray]]:
    """Per-step scores [T] of each signal for every episode (state-mode episodes: the scores read ``state``; the
    ``chosen`` signal its recorded chunks), computed in batches across episodes."""
    chosen = "chosen" in signals.signals
    if chosen:
        for ep in episodes:
            if ep.chunks is None or not len(ep.chunk_steps):
                raise ValueError(f"episode {ep.episode_id} kept no sampled chunks: the chosen signal scores them")
    # (episode, step, its chunk's index): the chunk a re-planning step sampled is the episode's c-th
    rows = [(i, int(s), c) for i, ep in enumerate(episodes) for c, s in enumerate(scored_steps(ep, every))]
    values: dict[str, np.ndarray] = {name: np.empty(len(rows)) for name in signals.signals}
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc=f"score {', '.join(signals.signals)}", unit="batch", disable=not progress):
        part = rows[start:start + batch_size]
        obs = {"state": np.stack([episodes[i].state[s] for i, s, _ in part])}
        chunks = np.stack([episodes[i].chunks[c] for i, _, c in part]) if chosen else None
        scores = signals(obs, [episodes[i].instruction for i, _, _ in part], chunks)
        for name, v in scores.items():
            values[name][start:start + len(part)] = v
    out: list[dict[str, np.ndarray]] = []
    offset = 0
    for ep in episodes:
        steps = scored_steps(ep, every)
        out.append({name: hold(v[offset:offset + len(steps)], steps, ep.length) for name, v in values.items()})
        offset += len(steps)
    return out
