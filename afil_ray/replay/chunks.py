"""Training pairs of (observation at a re-planning step, the whole chunk the policy sampled there).

The failure head can learn from what the policy *sampled* rather than from executed actions, which are
stitched from the first few actions of different samples; in a probe a failure head fine-tuned on executed
actions kept a loss about 30 times the success head's. Failure data is small (thousands of chunks), so the
pairs are gathered into memory once and re-read on ``refresh``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from afil_ray.replay.store import ReplayStore


class ChunkSampler:
    """Uniform (state, sampled chunk) pairs from the episodes of the selected tasks and outcomes."""

    def __init__(self, store: ReplayStore, horizon: int, *, tasks: Sequence[str], outcomes: Sequence[str],
                 seed: int = 0) -> None:
        self.store, self.horizon = store, horizon
        self.tasks, self.outcomes = list(tasks), list(outcomes)
        self.rng = np.random.default_rng(seed)
        self.partitions = [(t, o) for t in self.tasks for o in self.outcomes]
        self.refresh()

    def refresh(self) -> int:
        """Re-read the store; returns the number of (state, chunk) pairs."""
        states, chunks, parts = [], [], []
        if self.store.list_shards(task=self.tasks, outcome=self.outcomes):
            flt = ds.field("task").isin(self.tasks) & ds.field("outcome").isin(self.outcomes)
            table = self.store.dataset().to_table(columns=["task", "outcome", "state", "action", "chunk_steps",
                                                           "chunks"], filter=flt)
            for row in table.to_pylist():
                if not row["chunk_steps"]:
                    continue
                action_dim = len(row["action"][0])
                for step, chunk in zip(row["chunk_steps"], row["chunks"], strict=True):
                    c = np.asarray(chunk, np.float32).reshape(-1, action_dim)
                    if len(c) != self.horizon:
                        raise ValueError(f"stored chunks have horizon {len(c)}, the policy uses {self.horizon}")
                    states.append(np.asarray(row["state"][step], np.float32))
                    chunks.append(c)
                    parts.append(self.partitions.index((row["task"], row["outcome"])))
        self.state = np.stack(states) if states else np.zeros((0, 0), np.float32)
        self.chunk = np.stack(chunks) if chunks else np.zeros((0, self.horizon, 0), np.float32)
        self.partition = np.asarray(parts, np.int32)
        return len(self.state)

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
