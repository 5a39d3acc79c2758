"""Training rows of the success critic: (observation, sampled chunk, did its episode succeed), split by state.

Two kinds of rows, both read by :class:`~afil_ray.replay.chunks.ChunkSampler` (the same pairs of a re-planning
step's observation and the chunk sampled there, frames or their cached features included):

- branch rows: a ``branch`` episode's first chunk (sampled at the restored state, step 0) and the branch's outcome.
  The K branches of one state differ only by their chunk, so they are the rows that say which *action* succeeds.
- Monte-Carlo rows: every stored chunk of a ``data.critic_mc_outcomes`` episode, labelled with its episode's
  outcome. Plentiful, but the label credits the whole rest of the episode rather than the chunk.

The held-out split goes by the pair's origin, the initial state its episode descends from (task and seed,
``chunks.origin_of``): a group's branches, their parent and every other run of that seed fall on one side, so no
state the critic is evaluated on was trained on. It is a hash of the origin, the same in every run and process.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np

from afil_ray.replay.chunks import ChunkSampler
from afil_ray.replay.store import ReplayStore

BRANCH = "branch"
SPLITS = ("train", "test", "all")


def held_out(origin: str, fraction: float) -> bool:
    """Whether the rows descending from ``origin`` are held out: a hash of it, uniform in [0, 1), below ``fraction``."""
    digest = hashlib.sha256(origin.encode()).digest()[:8]
    return int.from_bytes(digest, "little") / 2**64 < fraction


class OutcomeSampler:
    """Batches of critic rows: ``state``, ``action`` (the chunk), ``action_is_pad``, ``instruction``, ``partition``,
    ``images``/``image_features``, and ``label`` (1.0: success), ``weight``, ``is_branch``, ``group``.

    ``split``: ``train`` keeps the origins not held out (``holdout`` is their fraction), ``test`` the held-out ones,
    ``all`` every row. With both kinds present, :meth:`sample` draws half a batch of branch rows and half of
    Monte-Carlo rows, weighted 1 and ``mc_weight``; ``mc_weight=0`` leaves the Monte-Carlo rows out.
    """

    def __init__(self, store: ReplayStore, horizon: int, *, tasks: Sequence[str], mc_outcomes: Sequence[str],
                 mc_weight: float = 1.0, holdout: float = 0.0, split: str = "train", seed: int = 0,
                 cameras: Sequence[str] | None = ()) -> None:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must be in [0, 1), got {holdout}")
        if mc_weight < 0:
            raise ValueError(f"mc_weight must be >= 0, got {mc_weight}")
        self.mc_outcomes = [o for o in mc_outcomes if o != BRANCH] if mc_weight > 0 else []
        self.mc_from_branches = mc_weight > 0 and BRANCH in mc_outcomes  # a branch's later chunks as MC rows too
        self.mc_weight, self.holdout, self.split = float(mc_weight), float(holdout), split
        self.outcomes = [BRANCH, *self.mc_outcomes]
        self.pairs = ChunkSampler(store, horizon, tasks=tasks, outcomes=self.outcomes, seed=seed, cameras=cameras)
        self.rng = np.random.default_rng(seed)
        self._held: dict[str, bool] = {}
        self._index()

    def refresh(self) -> int:
        """Read shards written since the last refresh (see ``ChunkSampler.refresh``); returns how many."""
        added = self.pairs.refresh()
        self._index()
        return added

    def encode_frames(self, encoder: Callable[[str, np.ndarray], np.ndarray]) -> None:
        """Frames to features once, for loaded and later shards (``ChunkSampler.encode_frames``)."""
        self.pairs.encode_frames(encoder)
        self._index()

    def _index(self) -> None:
        p = self.pairs
        outcome = np.array([o for _, o in p.partitions], object)[p.partition]  # partitions: tasks x outcomes
        for origin in set(p.origin.tolist()) - self._held.keys():
            self._held[origin] = held_out(origin, self.holdout)
        held = np.array([self._held[o] for o in p.origin], bool)
        side = {"train": ~held, "test": held, "all": np.ones(len(held), bool)}[self.split]
        is_branch = outcome == BRANCH
        self.branch_rows = np.flatnonzero(side & is_branch & (p.step == 0))
        mc = np.isin(outcome, self.mc_outcomes) | (is_branch & self.mc_from_branches & (p.step > 0))
        self.mc_rows = np.flatnonzero(side & mc)
        self.task = np.array([t for t, _ in p.partitions], object)[p.partition]

    # ---------------------------------------------------------------- what the trainer reads

    @property
    def num_steps(self) -> int:
        return len(self.branch_rows) + len(self.mc_rows)

    @property
    def partitions(self) -> list[tuple[str, str]]:
        return self.pairs.partitions

    @property
    def cameras(self) -> tuple[str, ...] | None:
        return self.pairs.cameras

    @property
    def state_dim(self) -> int:
        return self.pairs.state_dim

    @property
    def action_dim(self) -> int:
        return self.pairs.action_dim

    def sample(self, batch_size: int) -> dict[str, Any]:
        if not self.num_steps:
            raise RuntimeError(f"no critic rows ({self.split} split) under {self.pairs.store.root} for tasks="
                               f"{self.pairs.tasks}: no branches (afil-ray branch) and no stored chunks of "
                               f"{self.mc_outcomes or 'Monte-Carlo outcomes (train.critic_mc_weight=0)'}")
        # half a batch each when both kinds exist, else all of the one there is
        n_branch = (batch_size + 1) // 2 if len(self.mc_rows) and len(self.branch_rows) else \
            batch_size * int(len(self.branch_rows) > 0)
        rows = np.concatenate([self.rng.choice(self.branch_rows, n_branch),
                               self.rng.choice(self.mc_rows, batch_size - n_branch)])
        return self.gather(rows, np.arange(batch_size) < n_branch)

    def gather(self, rows: np.ndarray, is_branch: np.ndarray) -> dict[str, Any]:
        """The batch of pair ``rows`` (indices into ``pairs``), each a branch row or a Monte-Carlo row."""
        p = self.pairs
        rows = np.asarray(rows, np.int64)
        batch: dict[str, Any] = {
            "state": p.state[rows], "action": p.chunk[rows], "action_is_pad": np.zeros((len(rows), p.horizon), bool),
            "partition": p.partition[rows], "instruction": p.instruction[rows],
            "label": p.success[rows].astype(np.float32), "is_branch": np.asarray(is_branch, bool),
            "weight": np.where(is_branch, 1.0, self.mc_weight).astype(np.float32), "group": p.group[rows],
            "task": self.task[rows],
        }
        if p.frames:
            key = "images" if p.frame_encoder is None else "image_features"
            batch[key] = {cam: frames[rows] for cam, frames in p.frames.items()}
        return batch

    def batches(self, kind: str, batch_size: int) -> Iterator[dict[str, Any]]:
        """Every ``branch`` or ``mc`` row of this split once, in store order (for evaluation)."""
        if kind not in (BRANCH, "mc"):
            raise ValueError(f"kind must be branch or mc, got {kind!r}")
        rows = self.branch_rows if kind == BRANCH else self.mc_rows
        for start in range(0, len(rows), batch_size):
            part = rows[start: start + batch_size]
            yield self.gather(part, np.full(len(part), kind == BRANCH))
