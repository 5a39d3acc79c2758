"""Training pairs of (observation at a re-planning step, the whole chunk the policy sampled there).

The failure head can learn from what the policy *sampled* rather than from executed actions, which are
stitched from the first few actions of different samples; in a probe a failure head fine-tuned on executed
actions kept a loss about 30 times the success head's. Failure data is small (thousands of chunks), so the
pairs are gathered into memory, shard by shard as ``refresh`` finds new ones.

``window > 0`` keeps only the chunks sampled where the failure became irreversible: the ``window`` steps from
the latest restore point its correction found (``extra.restore_step`` of the ``corrected`` episode whose parent it
is), i.e. the actions that turned a state the planner could still finish into one it could not. Failures without
a correction have no such point and are skipped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from afil_ray.replay.sampler import restore_step, sync_shards
from afil_ray.replay.shard_io import ShardCorruptError, ShardFile
from afil_ray.replay.store import ReplayStore


@dataclass
class _Pairs:
    """The (state, chunk) pairs of one shard's episodes, with the step each chunk was sampled at."""

    episode_id: np.ndarray  # [N] object: the episode each pair comes from
    step: np.ndarray  # [N] int64
    state: np.ndarray  # [N, state_dim]
    chunk: np.ndarray  # [N, horizon, action_dim]
    partition: int


class ChunkSampler:
    """Uniform (state, sampled chunk) pairs from the episodes of the selected tasks and outcomes.

    Like :class:`~afil_ray.replay.sampler.WindowSampler`, :meth:`refresh` reads only the shards written since the
    last call (and forgets retired ones), and a damaged shard is quarantined rather than stopping training.
    """

    def __init__(self, store: ReplayStore, horizon: int, *, tasks: Sequence[str], outcomes: Sequence[str],
                 seed: int = 0, window: int = 0) -> None:
        if window < 0:
            raise ValueError(f"data.failure_window must be >= 0 (0: whole episodes), got {window}")
        self.store, self.horizon, self.window = store, horizon, window
        self.tasks, self.outcomes = list(tasks), list(outcomes)
        self.rng = np.random.default_rng(seed)
        self.partitions = [(t, o) for t in self.tasks for o in self.outcomes]
        self._pairs: dict[str, _Pairs] = {}  # shard path -> its pairs
        self._restore: dict[str, dict[str, int]] = {}  # corrected shard path -> {failure id: restore step}
        self.refresh()

    def refresh(self) -> int:
        """Read the shards written since the last refresh, forget retired ones; returns how many were added."""
        added = sync_shards(self._pairs, self.store.list_shards(task=self.tasks, outcome=self.outcomes), self._load)
        if self.window:
            corrected = self.store.list_shards(task=self.tasks, outcome=["corrected"])
            sync_shards(self._restore, corrected, self._load_restore)
        self._index()
        return added

    def _index(self) -> None:
        """Concatenate the loaded pairs, keeping only the window after each restore point when ``window`` > 0."""
        restore = {k: v for steps in self._restore.values() for k, v in steps.items()}
        keep = []
        for pairs in self._pairs.values():
            if self.window:
                first = np.array([restore.get(e, -1) for e in pairs.episode_id], np.int64)
                mask = (first >= 0) & (pairs.step >= first) & (pairs.step < first + self.window)
            else:
                mask = np.ones(len(pairs.step), bool)
            if mask.any():
                keep.append((pairs.state[mask], pairs.chunk[mask], np.full(int(mask.sum()), pairs.partition)))
        state_dim = next((p.state.shape[1] for p in self._pairs.values() if len(p.step)), 0)
        action_dim = next((p.chunk.shape[2] for p in self._pairs.values() if len(p.step)), 0)
        self.state = np.concatenate([k[0] for k in keep]) if keep else np.zeros((0, state_dim), np.float32)
        self.chunk = (np.concatenate([k[1] for k in keep]) if keep
                      else np.zeros((0, self.horizon, action_dim), np.float32))
        self.partition = np.concatenate([k[2] for k in keep]).astype(np.int32) if keep else np.zeros(0, np.int32)

    def _load(self, shard: ShardFile) -> _Pairs | None:
        table = self.store.read_checked(shard.path, ["episode_id", "state", "action", "chunk_steps", "chunks"])
        if table is None:  # gone, or damaged and now quarantined
            return None
        ids, steps, states, chunks = [], [], [], []
        for row in table.to_pylist():
            if not row["chunk_steps"]:
                continue
            action_dim = len(row["action"][0])
            for step, chunk in zip(row["chunk_steps"], row["chunks"], strict=True):
                c = np.asarray(chunk, np.float32).reshape(-1, action_dim)
                if len(c) != self.horizon:
                    raise ValueError(f"replay shard {self.store.abspath(shard.path)}: stored chunks have horizon "
                                     f"{len(c)}, the policy uses {self.horizon}")
                ids.append(row["episode_id"])
                steps.append(step)
                states.append(np.asarray(row["state"][step], np.float32))
                chunks.append(c)
        partition = self.partitions.index((shard.task, shard.outcome))
        if not ids:  # e.g. planner episodes: nothing to learn from, and nothing to re-read on the next refresh
            return _Pairs(np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                          np.zeros((0, self.horizon, 0), np.float32), partition)
        return _Pairs(np.asarray(ids, object), np.asarray(steps, np.int64), np.stack(states), np.stack(chunks),
                      partition)

    def _load_restore(self, shard: ShardFile) -> dict[str, int] | None:
        """failure episode id -> the step its correction (in this shard) restored from."""
        table = self.store.read_checked(shard.path, ["parent_episode_id", "extra"])
        if table is None:
            return None
        out = {}
        try:
            for r in table.to_pylist():
                step = restore_step(r["extra"])
                if r["parent_episode_id"] and step is not None:
                    out[r["parent_episode_id"]] = step
        except ShardCorruptError as e:  # as WindowSampler: set the shard aside, keep training
            self.store.quarantine(shard.path, str(e))
            return None
        return out

    @property
    def num_steps(self) -> int:
        return len(self.state)

    @property
    def state_dim(self) -> int:
        return self.state.shape[1]

    @property
    def action_dim(self) -> int:
        return self.chunk.shape[2]

    cameras: tuple[str, ...] = ()

    def sample(self, batch_size: int) -> dict[str, Any]:
        if not len(self.state):
            raise RuntimeError(f"no sampled chunks under {self.store.root} for tasks={self.tasks} "
                               f"outcomes={self.outcomes} (episodes recorded by policy rollouts carry them)")
        idx = self.rng.integers(0, len(self.state), size=batch_size)
        return {"state": self.state[idx], "action": self.chunk[idx],
                "action_is_pad": np.zeros((batch_size, self.horizon), bool), "partition": self.partition[idx]}
