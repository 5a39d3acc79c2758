"""Training pairs of (observation at a re-planning step, the whole chunk the policy sampled there).

The failure head can learn from what the policy *sampled* rather than from executed actions, which are
stitched from the first few actions of different samples; in a probe a failure head fine-tuned on executed
actions kept a loss about 30 times the success head's. Failure data is small (thousands of chunks), so the
pairs are gathered into memory, shard by shard as ``refresh`` finds new ones.

``window > 0`` keeps only the chunks sampled where the failure became irreversible: the ``window`` steps from
the latest restore point its correction found (``extra.restore_step`` of the ``corrected`` episode whose parent it
is), i.e. the actions that turned a state the planner could still finish into one it could not. Failures without
a correction have no such point and are skipped.

Each pair also keeps its episode's ``success``, its ``group`` (a branch's ``branch_group``, "" otherwise) and its
``origin``: the initial state it descends from (task and seed, so a parent, its branches and the other runs of
its seed share one), which the success critic splits its held-out states by (afil_ray/replay/outcomes.py).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from afil_ray.config import branch_success_filter, stored_outcomes
from afil_ray.replay.episode import IMAGE_PREFIX
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
    frames: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> [N, H, W, C] uint8, or its features
    instruction: np.ndarray | None = None  # [N] object: what the pair's episode read ("" where not recorded)
    success: np.ndarray | None = None  # [N] bool: the pair's episode succeeded
    group: np.ndarray | None = None  # [N] object: the branch group of a branch's pairs, "" otherwise
    origin: np.ndarray | None = None  # [N] object: the initial state the pair's episode descends from (origin_of)


def origin_of(task: str, seed: int | None, parent_episode_id: str | None, episode_id: str) -> str:
    """The initial state an episode descends from: task and seed (every run of a seed starts there, and branches
    carry their parent's seed), else its parent's id (a branch, a correction), else its own id."""
    if seed is not None:
        return f"{task}/seed={int(seed)}"
    return parent_episode_id or episode_id


class ChunkSampler:
    """Uniform (state, sampled chunk) pairs from the episodes of the selected tasks and outcomes.

    Like :class:`~afil_ray.replay.sampler.WindowSampler`, :meth:`refresh` reads only the shards written since the
    last call (and forgets retired ones), and a damaged shard is quarantined rather than stopping training. With
    ``cameras`` each pair also holds the frames the policy saw when it sampled the chunk (``images``), or their
    frozen encoder's features once :meth:`encode_frames` is set (``image_features``).
    """

    def __init__(self, store: ReplayStore, horizon: int, *, tasks: Sequence[str], outcomes: Sequence[str],
                 seed: int = 0, window: int = 0, cameras: Sequence[str] | None = ()) -> None:
        if window < 0:
            raise ValueError(f"data.failure_window must be >= 0 (0: whole episodes), got {window}")
        self.store, self.horizon, self.window = store, horizon, window
        self.cameras: tuple[str, ...] | None = tuple(cameras) if cameras is not None else None  # None: the shards'
        self.frame_encoder: Callable[[str, np.ndarray], np.ndarray] | None = None
        self.tasks, self.outcomes = list(tasks), stored_outcomes(list(outcomes))
        self.branch_success = branch_success_filter(list(outcomes))  # one outcome of the branches, or None
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
                n = len(pairs.step)
                said = pairs.instruction if pairs.instruction is not None else np.full(n, "", object)
                won = pairs.success if pairs.success is not None else np.zeros(n, bool)
                group = pairs.group if pairs.group is not None else np.full(n, "", object)
                origin = pairs.origin if pairs.origin is not None else pairs.episode_id
                keep.append((pairs.state[mask], pairs.chunk[mask], np.full(int(mask.sum()), pairs.partition),
                             {cam: frames[mask] for cam, frames in pairs.frames.items()}, said[mask],
                             pairs.step[mask], won[mask], group[mask], origin[mask]))
        state_dim = next((p.state.shape[1] for p in self._pairs.values() if len(p.step)), 0)
        action_dim = next((p.chunk.shape[2] for p in self._pairs.values() if len(p.step)), 0)
        self.state = np.concatenate([k[0] for k in keep]) if keep else np.zeros((0, state_dim), np.float32)
        self.chunk = (np.concatenate([k[1] for k in keep]) if keep
                      else np.zeros((0, self.horizon, action_dim), np.float32))
        self.partition = np.concatenate([k[2] for k in keep]).astype(np.int32) if keep else np.zeros(0, np.int32)
        self.frames = {cam: np.concatenate([k[3][cam] for k in keep]) for cam in self.cameras or ()} if keep else {}
        self.instruction = np.concatenate([k[4] for k in keep]) if keep else np.zeros(0, object)
        self.step = np.concatenate([k[5] for k in keep]) if keep else np.zeros(0, np.int64)
        self.success = np.concatenate([k[6] for k in keep]) if keep else np.zeros(0, bool)
        self.group = np.concatenate([k[7] for k in keep]) if keep else np.zeros(0, object)
        self.origin = np.concatenate([k[8] for k in keep]) if keep else np.zeros(0, object)

    def encode_frames(self, encoder: Callable[[str, np.ndarray], np.ndarray]) -> None:
        """Keep ``encoder(camera, frames)`` instead of pixels, for loaded and later shards (as
        :meth:`WindowSampler.encode_frames`: a frozen vision encoder then runs once per stored frame)."""
        self.frame_encoder = encoder
        for pairs in self._pairs.values():
            self._encode(pairs)
        self._index()

    def _encode(self, pairs: _Pairs) -> None:
        if self.frame_encoder is not None and pairs.frames and all(f.dtype == np.uint8 for f in pairs.frames.values()):
            pairs.frames = {cam: self.frame_encoder(cam, frames) for cam, frames in pairs.frames.items()}

    def _load(self, shard: ShardFile) -> _Pairs | None:
        if self.cameras is None:  # the first shard's cameras, required of every later one
            self.cameras = tuple(sorted(n[len(IMAGE_PREFIX):] for n in self.store.shard_schema(shard.path).names
                                        if n.startswith(IMAGE_PREFIX)))
        images = [IMAGE_PREFIX + cam for cam in self.cameras]
        if images:
            have = self.store.shard_schema(shard.path).names
            missing = [c for c in images if c not in have]
            if missing:
                raise ValueError(f"replay shard {self.store.abspath(shard.path)} has no images for camera(s) "
                                 f"{[c[len(IMAGE_PREFIX):] for c in missing]}; this sampler uses {list(self.cameras)}")
        columns = ["episode_id", "instruction", "state", "action", "chunk_steps", "chunks", "success", "seed",
                   "parent_episode_id"] + ["branch_group"] * (shard.outcome == "branch")  # older shards lack it
        table = self.store.read_checked(shard.path, columns)
        pixels = self.store.read_checked(shard.path, images) if images else None
        if table is None or (images and pixels is None):  # gone, or damaged and now quarantined
            return None
        ids, steps, states, chunks, said, won, groups, origins = [], [], [], [], [], [], [], []
        frames: dict[str, list[np.ndarray]] = {cam: [] for cam in (self.cameras if images else ())}
        for i, row in enumerate(table.select(columns).to_pylist()):
            if not row["chunk_steps"]:
                continue
            if shard.outcome == "branch" and self.branch_success is not None \
                    and bool(row["success"]) != self.branch_success:
                continue
            action_dim = len(row["action"][0])
            for cam in self.cameras:
                column = pixels.schema.field(IMAGE_PREFIX + cam)
                shape = tuple(json.loads(column.metadata[b"shape"]))
                episode = pixels.column(IMAGE_PREFIX + cam)[i].values.flatten().to_numpy(zero_copy_only=False)
                frames[cam].append(episode.reshape(-1, *shape)[row["chunk_steps"]])
            for step, chunk in zip(row["chunk_steps"], row["chunks"], strict=True):
                c = np.asarray(chunk, np.float32).reshape(-1, action_dim)
                if len(c) != self.horizon:
                    raise ValueError(f"replay shard {self.store.abspath(shard.path)}: stored chunks have horizon "
                                     f"{len(c)}, the policy uses {self.horizon}")
                ids.append(row["episode_id"])
                said.append(row["instruction"] or "")
                # the episode's outcome: a "failure" episode may have succeeded at some step and failed at another
                won.append(bool(row["success"]) and shard.outcome != "failure")
                groups.append(row.get("branch_group") or "")
                origins.append(origin_of(shard.task, row["seed"], row["parent_episode_id"], row["episode_id"]))
                steps.append(step)
                states.append(np.asarray(row["state"][step], np.float32))
                chunks.append(c)
        partition = self.partitions.index((shard.task, shard.outcome))
        if not ids:  # e.g. planner episodes: nothing to learn from, and nothing to re-read on the next refresh
            return _Pairs(np.zeros(0, object), np.zeros(0, np.int64), np.zeros((0, 0), np.float32),
                          np.zeros((0, self.horizon, 0), np.float32), partition)
        pairs = _Pairs(np.asarray(ids, object), np.asarray(steps, np.int64), np.stack(states), np.stack(chunks),
                       partition, {cam: np.concatenate(f) for cam, f in frames.items()}, np.asarray(said, object),
                       np.asarray(won, bool), np.asarray(groups, object), np.asarray(origins, object))
        self._encode(pairs)
        return pairs

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

    def sample(self, batch_size: int) -> dict[str, Any]:
        if not len(self.state):
            raise RuntimeError(f"no sampled chunks under {self.store.root} for tasks={self.tasks} "
                               f"outcomes={self.outcomes} (episodes recorded by policy rollouts carry them)")
        idx = self.rng.integers(0, len(self.state), size=batch_size)
        batch = {"state": self.state[idx], "action": self.chunk[idx],
                 "action_is_pad": np.zeros((batch_size, self.horizon), bool), "partition": self.partition[idx],
                 "instruction": self.instruction[idx]}
        if self.frames:
            key = "images" if self.frame_encoder is None else "image_features"
            batch[key] = {cam: frames[idx] for cam, frames in self.frames.items()}
        return batch
