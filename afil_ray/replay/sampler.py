"""Training batches of (observation, action chunk) windows drawn from memory-mapped replay shards.

Each shard's per-step columns are viewed as numpy arrays straight over the Arrow buffers: ``state``
becomes a [steps, D] view of the flat float32 values and the list offsets say where each episode starts.
Nothing is copied for uncompressed local shards, so a store larger than RAM costs address space and page
cache, not memory; only the sampled rows are gathered, one fancy index per shard touched. Compressed
(lz4/zstd) or remote shards cannot be mapped: their state, action and camera columns are read into memory.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from afil_ray.config import BALANCES, branch_success_filter, stored_outcomes
from afil_ray.replay.episode import IMAGE_PREFIX
from afil_ray.replay.shard_io import CORRUPTION_ERRORS, Selection, ShardCorruptError, ShardFile, selection_set
from afil_ray.replay.store import ReplayStore

Partition = tuple[str, str]  # (task, outcome)
T = TypeVar("T")


def sync_shards(cache: dict[str, T], listing: list[ShardFile], load: Callable[[ShardFile], T | None]) -> int:
    """Bring ``cache`` (shard path -> what ``load`` made of it) in line with ``listing``; returns how many were
    added. A shard ``load`` returns None for (gone, or damaged and quarantined) is looked at again next time."""
    present = {s.path for s in listing}
    for gone in [p for p in cache if p not in present]:
        del cache[gone]
    added = 0
    for shard in listing:
        if shard.path not in cache and (value := load(shard)) is not None:
            cache[shard.path] = value
            added += 1
    return added


def restore_step(extra: str | None) -> int | None:
    """The step a corrected episode's correction restored from (``extra.restore_step``), None if not recorded;
    an unreadable value is a :class:`ShardCorruptError`, so the samplers set its shard aside."""
    try:
        step = json.loads(extra or "{}").get("restore_step")
        return None if step is None else int(step)
    except (ValueError, TypeError, AttributeError) as e:
        raise ShardCorruptError(f"a corrected episode's extra.restore_step is unreadable ({e})") from e


@dataclass
class _Segment:
    """One record batch of one shard, as views."""

    shard: int  # index into WindowSampler.shard_paths
    first_row: int  # row of the segment's first episode within its shard
    partition: int  # index into WindowSampler.partitions
    state: np.ndarray  # [S, D]
    action: np.ndarray  # [S, A]
    episode_starts: np.ndarray  # [E + 1] int64: episode e is steps episode_starts[e]:episode_starts[e + 1]
    images: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> [S, H, W, C] uint8
    features: dict[str, np.ndarray] = field(default_factory=dict)  # camera -> [S, N, C]: encoded frames instead
    starts_at: np.ndarray | None = None  # the steps windows may start at (None: every step)
    instructions: np.ndarray | None = None  # [E] object: what each episode read ("" where a shard has none)

    @property
    def steps(self) -> int:
        """Window starts in this segment (every step, or those in ``starts_at``)."""
        return int(self.episode_starts[-1]) if self.starts_at is None else len(self.starts_at)


def _step_views(
    rel: str, name: str, column: pa.ListArray, width: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """(episode starts [E+1], per-step values [S, width]) of a list<list<x>> column, values not copied."""
    if column.null_count or column.values.null_count:
        raise ShardCorruptError(f"{name} has null episodes or steps")
    outer = column.offsets.to_numpy()
    steps = column.values
    inner = steps.offsets.to_numpy()[outer[0]: outer[-1] + 1]
    sizes = np.diff(inner)
    if len(sizes) and not np.all(sizes == sizes[0]):
        raise ValueError(f"replay shard {rel}: {name} vectors differ in size within the shard "
                         f"({sorted(set(sizes.tolist()))[:5]}); one sampler needs one size")
    size = int(sizes[0]) if len(sizes) else (width or 0)
    if width is not None and size != width:
        raise ValueError(f"replay shard {rel}: {name} has {size} values per step, the sampler's other shards "
                         f"have {width}")
    flat = steps.values.to_numpy(zero_copy_only=True)[inner[0]: inner[-1]]
    return (outer - outer[0]).astype(np.int64), flat.reshape(-1, size) if size else flat.reshape(0, 0)


class WindowSampler:
    """Uniform or partition-balanced windows over every timestep of the selected partitions.

    A window at step t of an episode of length T is the observation at t (``state[t]`` and each camera's
    ``images[t]``) and the action chunk ``action[t:t+horizon]``; steps past the end repeat the last action
    and are flagged in ``action_is_pad`` (LeRobot's convention), so every step is a valid start.

    ``corrected_from_restore=True`` starts windows of ``corrected`` episodes only from the step their
    correction restored from (``extra.restore_step``): the planner's suffix, not the failed prefix it kept.
    Windows there still see the whole suffix, and earlier steps are never an observation.

    ``balance="partitions"`` picks a (task, outcome) partition with equal probability, or by ``weights``, then a
    step uniformly within it; ``balance="tasks"`` picks a task with equal probability, then a step uniformly
    over that task's selected outcomes (a multi-task mixture whose tasks differ in episode length and count
    would otherwise train mostly on the longest); ``"none"``: steps are uniform over the whole selection.
    ``cameras=None`` takes the cameras of the first shard and requires them of every later one (``()`` for
    state only). Call :meth:`refresh` to pick up shards written since (and drop retired ones).
    """

    def __init__(
        self,
        store: ReplayStore,
        horizon: int,
        *,
        tasks: Selection = None,
        outcomes: Selection = None,
        balance: str = "none",
        weights: Mapping[Partition, float] | None = None,
        cameras: Sequence[str] | None = None,
        seed: int | None = 0,
        corrected_from_restore: bool = False,
    ) -> None:
        if horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {horizon}")
        self.store = store
        self.horizon = horizon
        self.tasks = selection_set(tasks)
        self.outcomes = None if outcomes is None else selection_set(stored_outcomes(list(selection_set(outcomes))))
        self.branch_success = branch_success_filter(None if outcomes is None else list(selection_set(outcomes)))
        if balance not in BALANCES:
            raise ValueError(f"balance must be one of {', '.join(BALANCES)}, got {balance!r}")
        self.balance = balance if weights is None else "partitions"
        self.weights = dict(weights) if weights is not None else None
        self.cameras: tuple[str, ...] | None = tuple(cameras) if cameras is not None else None
        self.corrected_from_restore = corrected_from_restore
        self.rng = np.random.default_rng(seed)
        self.state_dim: int | None = None
        self.action_dim: int | None = None
        self.image_shapes: dict[str, tuple[int, ...]] = {}
        self.frame_encoder: Callable[[str, np.ndarray], np.ndarray] | None = None
        self.feature_specs: dict[str, tuple[tuple[int, ...], np.dtype]] = {}  # camera -> encoded (shape, dtype)
        self.shard_paths: list[str] = []  # append-only, so batch["shard"] stays meaningful across refreshes
        self.partitions: list[Partition] = []  # append-only, indexed by batch["partition"]
        self._loaded: dict[str, list[_Segment]] = {}
        self._segments: list[_Segment] = []
        self._segment_starts = np.zeros(1, np.int64)
        self._pools = np.zeros((0, 3), np.int64)  # rows of (partition, first global step, steps)
        self._pool_probs = np.zeros(0)
        self._offsets_h = np.arange(horizon, dtype=np.int64)
        self.refresh()

    # ---------------------------------------------------------------- building

    def refresh(self) -> int:
        """Map shards written since the last refresh and forget retired ones; returns how many were added."""
        listing = self.store.list_shards(self.tasks, self.outcomes)
        added = sync_shards(self._loaded, listing, self._load)
        self._index([s.path for s in listing if s.path in self._loaded])
        return added

    def _partition_id(self, key: Partition) -> int:
        if key not in self.partitions:
            self.partitions.append(key)
        return self.partitions.index(key)

    def _load(self, shard: ShardFile) -> list[_Segment] | None:
        """Views over one shard, or None if it has gone or was damaged (then it is quarantined)."""
        try:
            schema = self.store.shard_schema(shard.path)
        except FileNotFoundError:
            return None
        except CORRUPTION_ERRORS as e:
            self.store.quarantine(shard.path, f"{type(e).__name__}: {e}")
            return None
        shard_cameras = tuple(sorted(n[len(IMAGE_PREFIX):] for n in schema.names
                                     if n.startswith(IMAGE_PREFIX)))
        if self.cameras is None:
            self.cameras = shard_cameras
        missing = [c for c in self.cameras if c not in shard_cameras]
        if missing:
            raise ValueError(f"replay shard {self.store.abspath(shard.path)} has no images for camera(s) "
                             f"{missing}; this sampler uses cameras {list(self.cameras)}")
        columns = ["state", "action"] + [IMAGE_PREFIX + c for c in self.cameras]
        from_restore = self.corrected_from_restore and shard.outcome == "corrected"
        split = self.branch_success is not None and shard.outcome == "branch"  # one outcome of the branches
        table = self.store.read_checked(shard.path, columns + ["instruction"] + ["extra"] * from_restore
                                        + ["success"] * split, verify=False)
        if table is None:
            return None
        if split:
            table = table.filter(pc.equal(table["success"], self.branch_success)).drop_columns(["success"])
        index = len(self.shard_paths)
        try:
            segments = self._segments_of(shard, index, table)
        except ShardCorruptError as e:
            self.store.quarantine(shard.path, f"{type(e).__name__}: {e}")
            return None
        self.shard_paths.append(shard.path)
        return segments

    def _segments_of(self, shard: ShardFile, index: int, table: pa.Table) -> list[_Segment]:
        rel = self.store.abspath(shard.path)
        partition = self._partition_id((shard.task, shard.outcome))
        segments, first_row = [], 0
        for batch in table.to_batches():
            starts, state = _step_views(rel, "state", batch.column("state"), self.state_dim)
            action_starts, action = _step_views(rel, "action", batch.column("action"), self.action_dim)
            if not np.array_equal(starts, action_starts):
                raise ShardCorruptError("state and action episode lengths differ")
            images = {}
            for cam in self.cameras or ():
                column = batch.column(IMAGE_PREFIX + cam)
                shape = tuple(json.loads(table.schema.field(IMAGE_PREFIX + cam).metadata[b"shape"]))
                if self.image_shapes.setdefault(cam, shape) != shape:
                    raise ValueError(f"replay shard {rel}: camera {cam!r} images are {shape}, the "
                                     f"sampler's other shards have {self.image_shapes[cam]}")
                image_starts, pixels = _step_views(rel, IMAGE_PREFIX + cam, column, int(np.prod(shape)))
                if not np.array_equal(starts, image_starts):
                    raise ShardCorruptError(f"camera {cam!r} and action episode lengths differ")
                images[cam] = pixels.reshape(-1, *shape)
            if len(state):  # dims become known from the first non-empty batch
                self.state_dim, self.action_dim = state.shape[1], action.shape[1]
            starts_at = None
            if "extra" in batch.schema.names:  # corrected episodes, windows from their restore step on
                restore = [restore_step(e) or 0 for e in batch.column("extra").to_pylist()]
                starts_at = np.concatenate([np.arange(min(r, int(b - a)), b - a) + a
                                            for r, a, b in zip(restore, starts[:-1], starts[1:], strict=True)]
                                           + [np.zeros(0, np.int64)]).astype(np.int64)
            said = np.array([i or "" for i in batch.column("instruction").to_pylist()], object)
            segment = _Segment(index, first_row, partition, state, action, starts, images, starts_at=starts_at,
                               instructions=said)
            self._encode_segment(segment)
            segments.append(segment)
            first_row += batch.num_rows
        return segments

    def encode_frames(self, encoder: Callable[[str, np.ndarray], np.ndarray]) -> None:
        """Keep ``encoder(camera, frames)`` of every frame instead of its pixels, now and for shards loaded later;
        batches then carry ``image_features`` {camera: [B, ...]} instead of ``images``. For a frozen vision
        encoder (``DAGPolicy.frame_features``): each frame is encoded once per sampler, not once per epoch."""
        self.frame_encoder = encoder
        for segments in self._loaded.values():
            for segment in segments:
                self._encode_segment(segment)

    def _encode_segment(self, segment: _Segment) -> None:
        if self.frame_encoder is None:
            return
        for cam in list(segment.images):
            features = segment.features[cam] = self.frame_encoder(cam, segment.images.pop(cam))
            self.feature_specs[cam] = (features.shape[1:], features.dtype)

    def _index(self, order: list[str]) -> None:
        """Global step numbering: segments in listing order (grouped by partition), one pool per partition."""
        self._segments = [seg for path in order for seg in self._loaded[path] if seg.steps]
        steps = np.array([seg.steps for seg in self._segments], np.int64)
        self._segment_starts = np.concatenate([[0], np.cumsum(steps)]).astype(np.int64)
        pools: dict[int, list[int]] = {}
        for i, seg in enumerate(self._segments):
            pool = pools.setdefault(seg.partition, [int(self._segment_starts[i]), 0])
            pool[1] += seg.steps
        self._pools = np.array([(p, start, n) for p, (start, n) in pools.items()], np.int64).reshape(-1, 3)
        if self.balance == "tasks":  # a pool's share of its task's steps, so every task sums to one
            tasks = np.array([self.partitions[p][0] for p in self._pools[:, 0]])
            task_steps = {t: self._pools[tasks == t, 2].sum() for t in set(tasks)}
            w = self._pools[:, 2] / np.array([task_steps[t] for t in tasks], np.float64)
        elif self.weights is None:
            w = np.ones(len(self._pools))
        else:
            w = np.array([self.weights.get(self.partitions[p], 0.0) for p in self._pools[:, 0]], np.float64)
        self._pool_probs = w / w.sum() if w.sum() > 0 else np.zeros(len(self._pools))

    # ---------------------------------------------------------------- sampling

    @property
    def num_steps(self) -> int:
        return int(self._segment_starts[-1])

    @property
    def num_episodes(self) -> int:
        return sum(len(seg.episode_starts) - 1 for segs in self._loaded.values() for seg in segs)

    def partition_steps(self) -> dict[Partition, int]:
        """Sampleable steps per (task, outcome)."""
        return {self.partitions[p]: int(n) for p, _, n in self._pools}

    def sample(self, batch_size: int) -> dict[str, Any]:
        """A batch of windows as numpy arrays.

        Keys: ``state`` [B, D] float32, ``action`` [B, H, A] float32, ``action_is_pad`` [B, H] bool,
        ``images`` {camera: [B, h, w, c] uint8} (only when the sampler has cameras), ``instruction`` [B] (what
        the window's episode read; "" for shards from before episodes recorded it), and where each window
        came from: ``partition`` [B] (index into :attr:`partitions`), ``shard`` [B] (index into
        :attr:`shard_paths`), ``row`` [B] (episode row in that shard), ``timestep`` [B].
        """
        if self.num_steps == 0:
            raise RuntimeError(f"no replay steps to sample under {self.store.root} for tasks={self.tasks} "
                               f"outcomes={self.outcomes}")
        if self.balance != "none":
            if not self._pool_probs.any():
                raise RuntimeError(f"none of the weighted partitions {self.weights} has data")
            pick = self.rng.choice(len(self._pools), size=batch_size, p=self._pool_probs)
            pools = self._pools[pick]
            steps = pools[:, 1] + self.rng.integers(0, pools[:, 2])
        else:
            steps = self.rng.integers(0, self.num_steps, size=batch_size)
        return self._gather(steps)

    def _gather(self, global_steps: np.ndarray) -> dict[str, Any]:
        n, h = len(global_steps), self.horizon
        batch: dict[str, Any] = {
            "state": np.empty((n, self.state_dim or 0), np.float32),
            "action": np.empty((n, h, self.action_dim or 0), np.float32),
            "action_is_pad": np.empty((n, h), bool),
            "partition": np.empty(n, np.int32),
            "shard": np.empty(n, np.int32),
            "row": np.empty(n, np.int32),
            "timestep": np.empty(n, np.int64),
            "instruction": np.empty(n, object),
        }
        if self.cameras and self.frame_encoder is not None:
            batch["image_features"] = {c: np.empty((n, *shape), dtype) for c, (shape, dtype) in
                                       self.feature_specs.items()}
        elif self.cameras:
            batch["images"] = {c: np.empty((n, *self.image_shapes[c]), np.uint8) for c in self.cameras}
        segment_ids = np.searchsorted(self._segment_starts, global_steps, side="right") - 1
        local_steps = global_steps - self._segment_starts[segment_ids]
        order = np.argsort(segment_ids, kind="stable")
        boundaries = np.flatnonzero(np.diff(segment_ids[order])) + 1
        for rows in np.split(order, boundaries):  # one group per shard segment touched
            seg = self._segments[segment_ids[rows[0]]]
            t = local_steps[rows] if seg.starts_at is None else seg.starts_at[local_steps[rows]]
            episode = np.searchsorted(seg.episode_starts, t, side="right") - 1
            start, end = seg.episode_starts[episode], seg.episode_starts[episode + 1]
            window = t[:, None] + self._offsets_h
            batch["action_is_pad"][rows] = window >= end[:, None]
            np.minimum(window, (end - 1)[:, None], out=window)
            batch["state"][rows] = seg.state[t]
            batch["action"][rows] = seg.action[window]
            batch["partition"][rows] = seg.partition
            batch["shard"][rows] = seg.shard
            batch["row"][rows] = seg.first_row + episode
            batch["timestep"][rows] = t - start
            batch["instruction"][rows] = seg.instructions[episode]
            for cam, pixels in seg.images.items():
                batch["images"][cam][rows] = pixels[t]
            for cam, encoded in seg.features.items():
                batch["image_features"][cam][rows] = encoded[t]
        return batch
