"""One episode as the replay store keeps it, and its Arrow row form.

An episode is one row: episode metadata as scalar columns, per-step data as list columns of equal length T
(the observation *before* each action), and the observation after the last action in ``final_state``.
Per-step vectors are ``list<list<float32>>`` rather than fixed-size lists so that tasks with different
state or action sizes share one schema and a whole store reads as one ``pyarrow.dataset``.

A ``branch`` episode is a continuation rolled out from a restored state of a stored rollout (afil_ray/branches/):
it holds only its own steps, from the restored step on, and ``branch_step`` (the parent's step it starts from),
``branch_index`` and ``branch_group`` (parent id and step: the branches of one state) say where it came from.
Shards written before these columns existed read them as null.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa

from afil_ray.config import STORED_OUTCOMES

OUTCOMES = STORED_OUTCOMES  # one list of the store's partitions, the config's (afil_ray/config.py)

_VEC_F32 = pa.list_(pa.list_(pa.float32()))
_VEC_U8 = pa.list_(pa.list_(pa.uint8()))

# Columns every episode row has, in order. Per-camera image columns ``rgb_<camera>`` follow when present.
BASE_SCHEMA = pa.schema(
    [
        pa.field("episode_id", pa.string(), nullable=False),
        pa.field("task", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("instruction", pa.string()),
        pa.field("seed", pa.int64()),
        pa.field("source", pa.string()),
        pa.field("run_id", pa.string()),  # the invocation that stored it (afil_ray/run_id.py); null in old shards
        pa.field("policy_version", pa.int64()),
        pa.field("sampler", pa.string()),
        pa.field("sampler_params", pa.string()),  # JSON object
        pa.field("control_mode", pa.string()),
        pa.field("obs_mode", pa.string()),
        pa.field("created", pa.timestamp("us", tz="UTC")),
        pa.field("length", pa.int32()),
        pa.field("success", pa.bool_()),  # success at any step (ManiSkill's success_once)
        pa.field("parent_episode_id", pa.string()),  # the failure a corrected episode (or a branch) came from
        # branches only (null otherwise and in older shards): the group of branches from one restored state
        # (parent id @ step), the parent's step the branch starts from, and its index within the group
        pa.field("branch_group", pa.string()),
        pa.field("branch_step", pa.int32()),
        pa.field("branch_index", pa.int32()),
        pa.field("extra", pa.string()),  # JSON object for anything a producer wants to keep
        # per-step columns, length T
        pa.field("state", _VEC_F32),
        pa.field("action", _VEC_F32),
        pa.field("reward", pa.list_(pa.float32())),
        pa.field("step_success", pa.list_(pa.bool_())),
        pa.field("terminated", pa.list_(pa.bool_())),
        pa.field("truncated", pa.list_(pa.bool_())),
        pa.field("final_state", pa.list_(pa.float32())),
        # simulator snapshots: the step index each was taken at (before that step's action) and its
        # safetensors-serialised flat state dict (see afil_ray.envs.snapshot)
        pa.field("snapshot_steps", pa.list_(pa.int32())),
        pa.field("snapshots", pa.list_(pa.binary())),
        # policy rollouts: at every re-planning step, the whole sampled chunk [H*A] and the sampler's per
        # integration-step guidance weight and cosine [K] (empty for demonstrations)
        pa.field("chunk_steps", pa.list_(pa.int32())),
        pa.field("chunks", _VEC_F32),
        pa.field("chunk_w", _VEC_F32),
        pa.field("chunk_cos", _VEC_F32),
    ]
)


IMAGE_PREFIX = "rgb_"  # replay column (and env observation key) of a camera's images: rgb_<camera>

def new_episode_id() -> str:
    return uuid.uuid4().hex


def branch_group(parent_episode_id: str, step: int) -> str:
    """The group id of the branches from one restored state: every branch from it, whatever its index, shares it."""
    return f"{parent_episode_id}@{int(step)}"


@dataclass
class Episode:
    """A finished episode. Arrays are numpy; ``images`` maps camera name to uint8 [T, H, W, C]."""

    task: str
    outcome: str
    state: np.ndarray  # [T, D] float32
    action: np.ndarray  # [T, A] float32
    reward: np.ndarray  # [T] float32
    step_success: np.ndarray  # [T] bool
    terminated: np.ndarray  # [T] bool
    truncated: np.ndarray  # [T] bool
    final_state: np.ndarray  # [D] float32
    instruction: str = ""
    seed: int | None = None
    source: str = ""
    run_id: str = ""  # which run stored it; the writer stamps its run's id on episodes that have none
    policy_version: int = -1
    sampler: str = ""
    sampler_params: dict = field(default_factory=dict)
    control_mode: str = ""
    obs_mode: str = "state"
    images: dict[str, np.ndarray] = field(default_factory=dict)
    snapshot_steps: list[int] = field(default_factory=list)
    snapshots: list[bytes] = field(default_factory=list)
    chunk_steps: list[int] = field(default_factory=list)
    chunks: np.ndarray | None = None  # [C, H, A] sampled chunks at chunk_steps
    chunk_w: np.ndarray | None = None  # [C, K] guidance weight per integration step (mean over the chunk)
    chunk_cos: np.ndarray | None = None  # [C, K] cos(v_s, v_f) per integration step
    parent_episode_id: str | None = None
    branch_step: int | None = None  # branches: the parent's step this episode was restored at (its step 0)
    branch_index: int | None = None  # branches: which of the state's branches (its noise seed depends on it)
    extra: dict = field(default_factory=dict)
    episode_id: str = field(default_factory=new_episode_id)
    created: datetime = field(default_factory=lambda: datetime.now(UTC))

    def __post_init__(self) -> None:
        if self.outcome not in OUTCOMES:
            raise ValueError(f"episode outcome must be one of {OUTCOMES}, got {self.outcome!r}")
        n = len(self.action)
        if n == 0:
            raise ValueError(f"episode {self.episode_id} ({self.task}) has no steps; nothing to store")
        for name in ("state", "reward", "step_success", "terminated", "truncated"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"episode {self.episode_id}: {name} has {len(getattr(self, name))} steps, "
                                 f"action has {n}")
        for cam, img in self.images.items():
            if len(img) != n or img.dtype != np.uint8 or img.ndim != 4:
                raise ValueError(f"episode {self.episode_id}: camera {cam!r} images must be uint8 "
                                 f"[T, H, W, C] with T={n}, got {img.dtype} {img.shape}")
        for name in ("chunks", "chunk_w", "chunk_cos"):
            arr = getattr(self, name)
            if arr is not None and len(arr) != len(self.chunk_steps):
                raise ValueError(f"episode {self.episode_id}: {len(arr)} {name} but {len(self.chunk_steps)} "
                                 f"chunk steps")
        if len(self.snapshot_steps) != len(self.snapshots):
            raise ValueError(f"episode {self.episode_id}: {len(self.snapshot_steps)} snapshot steps but "
                             f"{len(self.snapshots)} snapshots")
        is_branch = self.outcome == "branch"
        tagged = (self.parent_episode_id is not None, self.branch_step is not None, self.branch_index is not None)
        if is_branch and not all(tagged):
            raise ValueError(f"episode {self.episode_id}: a branch needs parent_episode_id, branch_step and "
                             f"branch_index, got {self.parent_episode_id!r}, {self.branch_step!r}, "
                             f"{self.branch_index!r}")
        if not is_branch and (self.branch_step is not None or self.branch_index is not None):
            raise ValueError(f"episode {self.episode_id}: branch_step and branch_index belong to outcome "
                             f"'branch', not {self.outcome!r}")

    @property
    def length(self) -> int:
        return len(self.action)

    @property
    def success(self) -> bool:
        return bool(np.any(self.step_success))

    @property
    def branch_group(self) -> str | None:
        """Parent id @ step for a branch (what its group's branches share), None for other episodes."""
        if self.branch_step is None or self.parent_episode_id is None:
            return None
        return branch_group(self.parent_episode_id, self.branch_step)


def _nested_f32(arrays: list[np.ndarray]) -> pa.Array:
    """[episodes][T, D] float arrays -> list<list<float32>> from flat buffers (no Python loop per step)."""
    inner_lengths, flats, outer = [], [], [0]
    for a in arrays:
        a = np.asarray(a, dtype=np.float32)
        a = a.reshape(len(a), -1) if a.size else np.zeros((len(a), 0), np.float32)
        inner_lengths.append(np.full(len(a), a.shape[1], dtype=np.int32))
        flats.append(a.ravel())
        outer.append(outer[-1] + len(a))
    lens = np.concatenate(inner_lengths) if inner_lengths else np.zeros(0, np.int32)
    inner_offsets = np.concatenate([[0], np.cumsum(lens, dtype=np.int64)]).astype(np.int32)
    values = pa.array(np.concatenate(flats) if flats else np.zeros(0, np.float32), type=pa.float32())
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets, pa.int32()), values)
    return pa.ListArray.from_arrays(pa.array(np.asarray(outer, np.int32), pa.int32()), inner)


def _nested_u8(arrays: list[np.ndarray]) -> pa.Array:
    """[episodes][T, H, W, C] uint8 -> list<list<uint8>>, one inner list per step (H*W*C values)."""
    inner_lengths, flats, outer = [], [], [0]
    for a in arrays:
        a = np.ascontiguousarray(a, dtype=np.uint8)
        per_step = int(np.prod(a.shape[1:]))
        inner_lengths.append(np.full(len(a), per_step, dtype=np.int64))
        flats.append(a.reshape(-1))
        outer.append(outer[-1] + len(a))
    lens = np.concatenate(inner_lengths)
    inner_offsets = np.concatenate([[0], np.cumsum(lens)])
    if inner_offsets[-1] > np.iinfo(np.int32).max:
        raise ValueError("too many image bytes for one shard; lower replay.episodes_per_shard")
    inner = pa.ListArray.from_arrays(pa.array(inner_offsets.astype(np.int32)),
                                     pa.array(np.concatenate(flats)))
    return pa.ListArray.from_arrays(pa.array(np.asarray(outer, np.int32), pa.int32()), inner)


def _rows(arr: np.ndarray | None) -> np.ndarray:
    """[C, ...] -> [C, prod(...)] float32; None -> [0, 0]."""
    if arr is None or len(arr) == 0:
        return np.zeros((0, 0), np.float32)
    arr = np.asarray(arr, np.float32)
    return arr.reshape(len(arr), -1)


def episodes_to_table(episodes: list[Episode]) -> pa.Table:
    """Rows for a list of episodes; all must have the same cameras (one shard holds one partition)."""
    if not episodes:
        raise ValueError("episodes_to_table needs at least one episode")
    cameras = sorted(episodes[0].images)
    for ep in episodes:
        if sorted(ep.images) != cameras:
            raise ValueError(f"episode {ep.episode_id} has cameras {sorted(ep.images)}, expected {cameras}")

    def col(name):
        return [getattr(ep, name) for ep in episodes]

    data = {
        "episode_id": pa.array(col("episode_id"), pa.string()),
        "task": pa.array(col("task"), pa.string()),
        "outcome": pa.array(col("outcome"), pa.string()),
        "instruction": pa.array(col("instruction"), pa.string()),
        "seed": pa.array(col("seed"), pa.int64()),
        "source": pa.array(col("source"), pa.string()),
        "run_id": pa.array([r or None for r in col("run_id")], pa.string()),
        "policy_version": pa.array(col("policy_version"), pa.int64()),
        "sampler": pa.array(col("sampler"), pa.string()),
        "sampler_params": pa.array([json.dumps(p, sort_keys=True) for p in col("sampler_params")],
                                   pa.string()),
        "control_mode": pa.array(col("control_mode"), pa.string()),
        "obs_mode": pa.array(col("obs_mode"), pa.string()),
        "created": pa.array(col("created"), pa.timestamp("us", tz="UTC")),
        "length": pa.array([ep.length for ep in episodes], pa.int32()),
        "success": pa.array([ep.success for ep in episodes], pa.bool_()),
        "parent_episode_id": pa.array(col("parent_episode_id"), pa.string()),
        "branch_group": pa.array(col("branch_group"), pa.string()),
        "branch_step": pa.array(col("branch_step"), pa.int32()),
        "branch_index": pa.array(col("branch_index"), pa.int32()),
        "extra": pa.array([json.dumps(e, sort_keys=True) for e in col("extra")], pa.string()),
        "state": _nested_f32(col("state")),
        "action": _nested_f32(col("action")),
        "reward": pa.array([np.asarray(r, np.float32) for r in col("reward")], pa.list_(pa.float32())),
        "step_success": pa.array([np.asarray(x, bool) for x in col("step_success")], pa.list_(pa.bool_())),
        "terminated": pa.array([np.asarray(x, bool) for x in col("terminated")], pa.list_(pa.bool_())),
        "truncated": pa.array([np.asarray(x, bool) for x in col("truncated")], pa.list_(pa.bool_())),
        "final_state": pa.array([np.asarray(x, np.float32) for x in col("final_state")],
                                pa.list_(pa.float32())),
        "snapshot_steps": pa.array(col("snapshot_steps"), pa.list_(pa.int32())),
        "snapshots": pa.array(col("snapshots"), pa.list_(pa.binary())),
        "chunk_steps": pa.array(col("chunk_steps"), pa.list_(pa.int32())),
        "chunks": _nested_f32([_rows(ep.chunks) for ep in episodes]),
        "chunk_w": _nested_f32([_rows(ep.chunk_w) for ep in episodes]),
        "chunk_cos": _nested_f32([_rows(ep.chunk_cos) for ep in episodes]),
    }
    fields = list(BASE_SCHEMA)
    for cam in cameras:
        shape = episodes[0].images[cam].shape[1:]
        data[IMAGE_PREFIX + cam] = _nested_u8([ep.images[cam] for ep in episodes])
        fields.append(pa.field(IMAGE_PREFIX + cam, _VEC_U8, metadata={"shape": json.dumps(list(shape))}))
    return pa.Table.from_pydict(data, schema=pa.schema(fields))


def _unnest(col: pa.Array, i: int, dtype) -> np.ndarray:
    """Row i of a list<list<x>> column as a [T, D] array (zero-copy where Arrow allows)."""
    steps = col[i].values  # list<x> of length T
    if len(steps) == 0:
        return np.zeros((0, 0), dtype)
    flat = steps.flatten().to_numpy(zero_copy_only=False)
    return flat.reshape(len(steps), -1).astype(dtype, copy=False)


def _optional(cols: dict, name: str, i: int, schema: pa.Schema) -> np.ndarray | None:
    """A [C, width] chunk column as an array, None when absent (older shards) or empty; chunks are returned
    flat per chunk ([C, H*A]): the shape lives in the policy, not the store."""
    if name not in cols or cols[name][i].as_py() in (None, []):
        return None
    return _unnest(cols[name], i, np.float32)


def _chunks(flat: np.ndarray | None, action_col: pa.Array, i: int) -> np.ndarray | None:
    """Chunks are stored flat ([C, H*A]); A is the episode's action width, so [C, H, A] comes back."""
    if flat is None:
        return None
    action_dim = len(action_col[i].values[0]) if len(action_col[i].values) else 1
    return flat.reshape(len(flat), -1, action_dim)


def table_to_episodes(table: pa.Table) -> list[Episode]:
    """Inverse of :func:`episodes_to_table` (for round trips and small reads, not the training hot path)."""
    cols = {name: table.column(name).combine_chunks() for name in table.column_names}
    cameras = {n[len(IMAGE_PREFIX):]: table.schema.field(n) for n in table.column_names
               if n.startswith(IMAGE_PREFIX)}
    out = []
    for i in range(table.num_rows):
        def scalar(name, i=i):
            return cols[name][i].as_py()

        images = {}
        for cam, fld in cameras.items():
            shape = json.loads(fld.metadata[b"shape"])
            images[cam] = _unnest(cols[IMAGE_PREFIX + cam], i, np.uint8).reshape(-1, *shape)
        out.append(
            Episode(
                episode_id=scalar("episode_id"),
                task=scalar("task"),
                outcome=scalar("outcome"),
                instruction=scalar("instruction"),
                seed=scalar("seed"),
                source=scalar("source"),
                run_id=(scalar("run_id") if "run_id" in cols else None) or "",
                policy_version=scalar("policy_version"),
                sampler=scalar("sampler"),
                sampler_params=json.loads(scalar("sampler_params") or "{}"),
                control_mode=scalar("control_mode"),
                obs_mode=scalar("obs_mode"),
                created=scalar("created"),
                parent_episode_id=scalar("parent_episode_id"),
                branch_step=scalar("branch_step") if "branch_step" in cols else None,
                branch_index=scalar("branch_index") if "branch_index" in cols else None,
                extra=json.loads(scalar("extra") or "{}"),
                state=_unnest(cols["state"], i, np.float32),
                action=_unnest(cols["action"], i, np.float32),
                reward=np.asarray(scalar("reward"), np.float32),
                step_success=np.asarray(scalar("step_success"), bool),
                terminated=np.asarray(scalar("terminated"), bool),
                truncated=np.asarray(scalar("truncated"), bool),
                final_state=np.asarray(scalar("final_state"), np.float32),
                snapshot_steps=scalar("snapshot_steps"),
                snapshots=scalar("snapshots"),
                chunk_steps=scalar("chunk_steps") or [],
                chunks=_chunks(_optional(cols, "chunks", i, table.schema), cols["action"], i),
                chunk_w=_optional(cols, "chunk_w", i, table.schema),
                chunk_cos=_optional(cols, "chunk_cos", i, table.schema),
                images=images,
            )
        )
    return out
