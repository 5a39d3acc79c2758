"""Training pairs of (observation at a re-planning step, the whole chunk the policy sampled there).

The failure head can learn from what the policy *sampled* rather than from executed actions, which are
stitched from the first few actions of different samples; in a probe a failure head fine-tuned on executed
actions kept a loss about 30 times the success head's. Failure data is small (thousands of chunks), so the
pairs are gathered into memory once and re-read on ``refresh``.

``window > 0`` keeps only the chunks sampled where the failure became irreversible: the ``window`` steps from
the latest restore point its correction found (``extra.restore_step`` of the ``corrected`` episode whose parent it
is), i.e. the actions that turned a state the planner could still finish into one it could not. Failures without
a correction have no such point and are skipped.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow.dataset as ds

from afil_ray.replay.store import ReplayStore


class ChunkSampler:
    """Uniform (state, sampled chunk) pairs from the episodes of the selected tasks and outcomes."""

    def __init__(self, store: ReplayStore, horizon: int, *, tasks: Sequence[str], outcomes: Sequence[str],
                 seed: int = 0, window: int = 0) -> None:
        if window < 0:
            raise ValueError(f"data.failure_window must be >= 0 (0: whole episodes), got {window}")
        self.store, self.horizon, self.window = store, horizon, window
        self.tasks, self.outcomes = list(tasks), list(outcomes)
        self.rng = np.random.default_rng(seed)
        self.partitions = [(t, o) for t in self.tasks for o in self.outcomes]
        self.refresh()

    def refresh(self) -> int:
        """Re-read the store; returns the number of (state, chunk) pairs."""
        states, chunks, parts = [], [], []
        if self.store.list_shards(task=self.tasks, outcome=self.outcomes):
            flt = ds.field("task").isin(self.tasks) & ds.field("outcome").isin(self.outcomes)
            table = self.store.dataset().to_table(columns=["episode_id", "task", "outcome", "state", "action",
                                                           "chunk_steps", "chunks"], filter=flt)
            restore = self._restore_steps() if self.window else {}
            for row in table.to_pylist():
                if not row["chunk_steps"]:
                    continue
                if self.window and row["episode_id"] not in restore:
                    continue
                first = restore.get(row["episode_id"], 0)
                last = first + self.window if self.window else len(row["action"])
                action_dim = len(row["action"][0])
                for step, chunk in zip(row["chunk_steps"], row["chunks"], strict=True):
                    if not first <= step < last:
                        continue
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

    def _restore_steps(self) -> dict[str, int]:
        """episode id of a corrected failure -> the step its correction restored from."""
        flt = ds.field("task").isin(self.tasks) & (ds.field("outcome") == "corrected")
        if not self.store.list_shards(task=self.tasks, outcome=["corrected"]):
            return {}
        rows = self.store.dataset().to_table(columns=["parent_episode_id", "extra"], filter=flt).to_pylist()
        out = {}
        for r in rows:
            step = json.loads(r["extra"] or "{}").get("restore_step")
            if r["parent_episode_id"] and step is not None:
                out[r["parent_episode_id"]] = int(step)
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
