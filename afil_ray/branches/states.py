"""Which states of a stored rollout branches start from.

A state is eligible when the parent has a simulator snapshot there and re-planned there (a chunk boundary of its
execution, ``chunk_steps``): a branch then starts exactly where one of the parent's own chunks was sampled, from
the same observation, so the parent's chunk could join the group as one more sample. With ``env.snapshot_every``
a multiple of ``sampler.execute_steps`` every snapshot is on a boundary; otherwise only their common multiples
are (snapshots every 10 steps, chunks every 8: steps 0, 40, 80, ...). The step a parent ended at has no snapshot.

A state is open while its outcome is still undecided: a scorer (a callable giving each state's estimated
success probability, batched so that a critic scores a parent's states in one pass) keeps those whose estimate
lies in ``[branches.open_low, branches.open_high]``. Without a scorer every eligible state counts as open, so the
budget is spread uniformly over eligible states. Each parent then gets up to ``branches.states_per_episode``
open states, in an order drawn from (``branches.seed``, parent id) alone: a re-run chooses the same states,
and raising the quota adds states without moving the ones already branched.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection, Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from afil_ray.config import BranchConfig
from afil_ray.envs.base import Obs
from afil_ray.replay.episode import IMAGE_PREFIX, Episode, branch_group


@dataclass(frozen=True)
class BranchPoint:
    """One state of a stored rollout, with the snapshot that restores it (``estimate``: the scorer's, if any)."""

    parent: Episode
    step: int
    snapshot: bytes
    estimate: float | None = None

    @property
    def group(self) -> str:
        return branch_group(self.parent.episode_id, self.step)

    def observation(self) -> Obs:
        """What the parent's policy saw at this step, unbatched (``state``, ``rgb_<camera>``)."""
        obs = {"state": self.parent.state[self.step]}
        for cam, frames in self.parent.images.items():
            obs[IMAGE_PREFIX + cam] = frames[self.step]
        return obs


# states -> one estimated success probability per state (the success critic's V: :func:`critic_scorer`)
Scorer = Callable[[Sequence[BranchPoint]], Sequence[float]]


def critic_scorer(value: Callable[[Obs, list[str]], np.ndarray]) -> Scorer:
    """A scorer from a state-value function (``DAGPolicy.v``: P(success | s) for batched observations and
    instructions): each state is scored on what the parent saw there and the instruction it read."""
    def score(points: Sequence[BranchPoint]) -> Sequence[float]:
        if not points:
            return []
        views = [p.observation() for p in points]
        obs = {k: np.stack([v[k] for v in views]) for k in views[0]}
        return [float(x) for x in value(obs, [p.parent.instruction or "" for p in points])]
    return score


def eligible_steps(snapshot_steps: Iterable[int], chunk_steps: Iterable[int], length: int) -> list[int]:
    """Steps with a snapshot that are also re-planning steps of the parent, before its end, ascending."""
    return sorted(s for s in set(snapshot_steps) & set(chunk_steps) if 0 <= s < length)


def id_entropy(text: str) -> int:
    """64 bits of a string id (episode ids are uuid hex, but any string works), for seeding."""
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def parent_order(parent_id: str, steps: Sequence[int], seed: int) -> list[int]:
    """``steps`` in the parent's own random order, a function of (seed, parent id) only."""
    rng = np.random.default_rng([seed, id_entropy(parent_id)])
    return [steps[i] for i in rng.permutation(len(steps))]


def choose_steps(parent_id: str, steps: Sequence[int], cfg: BranchConfig, *, started: Collection[int] = (),
                 is_open: Callable[[int], bool] | None = None) -> list[int]:
    """The states of a parent to branch from, ascending: states already started (branches of them are in the
    store) first, so an interrupted group is finished whatever a scorer says of it now, then open ones in the
    parent's order, up to ``states_per_episode``."""
    order = parent_order(parent_id, list(steps), cfg.seed)
    quota = cfg.states_per_episode or len(order)
    chosen = [s for s in order if s in started][:quota]
    for s in order:
        if len(chosen) >= quota:
            break
        if s not in started and (is_open is None or is_open(s)):
            chosen.append(s)
    return sorted(chosen)


def open_points(parent: Episode, cfg: BranchConfig, scorer: Scorer | None = None,
                started: Collection[int] = (), limit: int | None = None) -> list[BranchPoint]:
    """The chosen states of ``parent`` as restorable points (scored by ``scorer`` when given); ``limit``: the
    branching env's episode limit, at or past which a state has no steps left."""
    snaps = dict(zip(parent.snapshot_steps, parent.snapshots, strict=True))
    end = parent.length if limit is None else min(parent.length, limit)
    steps = eligible_steps(parent.snapshot_steps, parent.chunk_steps, end)
    points = {s: BranchPoint(parent, s, snaps[s]) for s in steps}
    is_open = None
    if scorer is not None and points:
        scored = list(points.values())
        estimates = np.asarray(scorer(scored), np.float64).reshape(-1)
        if len(estimates) != len(scored):
            raise ValueError(f"the branch scorer returned {len(estimates)} estimates for {len(scored)} states")
        points = {p.step: BranchPoint(parent, p.step, p.snapshot, float(e))
                  for p, e in zip(scored, estimates, strict=True)}

        def is_open(s: int) -> bool:
            e = points[s].estimate
            return e is not None and cfg.open_low <= e <= cfg.open_high  # a NaN estimate is never open

    return [points[s] for s in choose_steps(parent.episode_id, steps, cfg, started=started, is_open=is_open)]
