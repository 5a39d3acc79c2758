"""Keeping a replay root healthy: the manifest, stats, retention, quarantine of damaged shards, clean-up.

These are the jobs that look after shards once they are written, apart from writing and reading them
(:mod:`afil_ray.replay.shard_io`, :mod:`afil_ray.replay.store`). Each is a function of a
:class:`~afil_ray.replay.shard_io.ShardFiles`; a ``ReplayStore`` is one and offers them as methods.

Files they keep beside the partitions::

    _manifest.arrow                                  rebuildable cache of shard facts
    _quarantine/task=.../outcome=.../<name>.arrow    corrupt shards, moved aside

The manifest is the only shared mutable file; it is a cache that any reader can reconcile or rebuild, so
last writer wins.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from afil_ray.replay.shard_io import (
    CORRUPTION_ERRORS,
    META_EPISODES,
    META_STEPS,
    META_WRITER,
    TEMP_SUFFIX,
    CorruptShard,
    Selection,
    ShardFile,
    ShardFiles,
)

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.arrow"
QUARANTINE_DIR = "_quarantine"

MANIFEST_SCHEMA = pa.schema(
    [
        pa.field("path", pa.string(), nullable=False),  # relative to the root, '/'-separated
        pa.field("task", pa.string(), nullable=False),
        pa.field("outcome", pa.string(), nullable=False),
        pa.field("episodes", pa.int64(), nullable=False),
        pa.field("steps", pa.int64(), nullable=False),
        pa.field("bytes", pa.int64(), nullable=False),
        pa.field("created", pa.timestamp("ns", tz="UTC"), nullable=False),
        pa.field("writer_id", pa.string()),
        pa.field("arrow_schema", pa.binary()),  # serialised shard schema, so dataset() can unify without I/O
    ]
)


@dataclass(frozen=True)
class PartitionStats:
    task: str
    outcome: str
    shards: int
    episodes: int
    steps: int
    bytes: int


# ---------------------------------------------------------------- quarantine and checked reads


def quarantine(files: ShardFiles, rel: str, reason: str) -> CorruptShard:
    """Move a shard to ``_quarantine/<same relative path>`` (never delete it) and report it."""
    dest = f"{QUARANTINE_DIR}/{rel}"
    try:
        if files.is_local:
            os.makedirs(os.path.dirname(files.abspath(dest)), exist_ok=True)
            if os.path.exists(files.abspath(dest)):
                dest = f"{dest}.{uuid.uuid4().hex[:8]}"
            os.rename(files.abspath(rel), files.abspath(dest))
        else:
            files.fs.create_dir(files.abspath(dest).rsplit("/", 1)[0], recursive=True)
            files.fs.move(files.abspath(rel), files.abspath(dest))
        moved_to: str | None = dest
    except FileNotFoundError:  # another process moved or retired it first
        moved_to = None
    record = CorruptShard(rel, reason, moved_to)
    log.warning("replay shard %s is corrupt (%s); %s", files.abspath(rel), reason,
                f"moved to {files.abspath(moved_to)}" if moved_to else "it had already gone")
    files.quarantined.append(record)
    files.episode_counts.pop(rel, None)
    return record


def list_quarantined(files: ShardFiles) -> list[str]:
    """Relative paths of everything in ``_quarantine`` (moved aside by any process, any time)."""
    base = f"{files.root}/{QUARANTINE_DIR}"
    infos = files.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
    return sorted(i.path[len(files.root) + 1:] for i in infos if i.type == pafs.FileType.File)


def read_checked(
    files: ShardFiles, rel: str, columns: list[str] | None = None, *, verify: bool = True
) -> pa.Table | None:
    """``read_shard``, quarantining a damaged shard; None if it is damaged or has gone."""
    try:
        return files.read_shard(rel, columns, verify=verify)
    except FileNotFoundError:
        return None
    except KeyError:
        raise
    except CORRUPTION_ERRORS as e:
        quarantine(files, rel, f"{type(e).__name__}: {e}")
        return None


def verify(files: ShardFiles, task: Selection = None, outcome: Selection = None) -> list[CorruptShard]:
    """Read every shard in full (checksums included), quarantine the damaged ones and return them."""
    before = len(files.quarantined)
    for shard in files.list_shards(task, outcome):
        read_checked(files, shard.path)
    return files.quarantined[before:]


# ---------------------------------------------------------------- manifest and stats


def _footer_row(files: ShardFiles, shard: ShardFile) -> dict[str, Any] | None:
    """Manifest facts from a shard's footer alone; None if the shard vanished or was quarantined."""
    try:
        f = files.open_input(shard.path)
    except FileNotFoundError:
        return None
    try:
        with f:
            reader = ipc.open_file(f)
            schema = reader.schema
            md = schema.metadata or {}
            if META_EPISODES in md:
                episodes, steps = int(md[META_EPISODES]), int(md[META_STEPS])
            else:  # a shard written by another tool: count what is there
                table = reader.read_all()
                episodes = table.num_rows
                steps = int(pc.sum(table["length"]).as_py() or 0) if "length" in table.column_names else 0
    except FileNotFoundError:
        return None
    except (*CORRUPTION_ERRORS, ValueError, KeyError) as e:  # ValueError, KeyError: unparseable metadata
        quarantine(files, shard.path, f"{type(e).__name__}: {e}")
        return None
    files.episode_counts[shard.path] = episodes
    return {
        "path": shard.path,
        "task": shard.task,
        "outcome": shard.outcome,
        "episodes": episodes,
        "steps": steps,
        "bytes": shard.bytes,
        "created": shard.created_ns,
        "writer_id": md.get(META_WRITER, b"").decode() or None,
        "arrow_schema": schema.remove_metadata().serialize().to_pybytes(),
    }


def _load_manifest(files: ShardFiles) -> pa.Table | None:
    try:
        with files.open_input(MANIFEST_NAME) as f:
            table = ipc.open_file(f).read_all()
    except FileNotFoundError:
        return None
    except (pa.ArrowException, OSError) as e:
        log.warning("replay manifest %s is unreadable (%s); rebuilding it", files.abspath(MANIFEST_NAME), e)
        return None
    if not table.schema.equals(MANIFEST_SCHEMA):
        log.info("replay manifest %s has an older layout; rebuilding it", files.abspath(MANIFEST_NAME))
        return None
    return table


def _save_manifest(files: ShardFiles, table: pa.Table) -> None:
    def write(sink: pa.NativeFile) -> None:
        with ipc.new_file(sink, MANIFEST_SCHEMA) as w:
            w.write_table(table)

    files.write_atomic(MANIFEST_NAME, write)


def _manifest_table(files: ShardFiles, shards: list[ShardFile]) -> pa.Table:
    """Manifest rows read from the footers of ``shards`` (the damaged ones are quarantined and left out)."""
    rows = [r for r in (_footer_row(files, s) for s in shards) if r is not None]
    return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)


def _sorted(table: pa.Table) -> pa.Table:
    return table.sort_by([("task", "ascending"), ("outcome", "ascending"), ("created", "ascending"),
                          ("path", "ascending")])


def manifest(files: ShardFiles, refresh: bool = True) -> pa.Table:
    """One row per shard (path, task, outcome, episodes, steps, bytes, created, writer_id, arrow_schema).

    With ``refresh`` the cached ``_manifest.arrow`` is reconciled against the directory: footers are read
    only for shards it does not know, vanished shards are dropped, and it is written back if it changed.
    """
    cached = _load_manifest(files)
    if cached is not None and not refresh:
        return cached
    shards = files.list_shards()
    if cached is None:
        kept, new = _manifest_table(files, []), shards
    else:
        listing = pa.table({"path": pa.array([s.path for s in shards], pa.string()),
                            "bytes": pa.array([s.bytes for s in shards], pa.int64())})
        kept = cached.join(listing, keys=["path", "bytes"], join_type="left semi")
        kept = kept.select(MANIFEST_SCHEMA.names)
        known = set(kept["path"].to_pylist())
        new = [s for s in shards if s.path not in known]
    added = _manifest_table(files, new)
    table = _sorted(pa.concat_tables([kept.cast(MANIFEST_SCHEMA), added]))
    if added.num_rows or (cached is not None and kept.num_rows != cached.num_rows):  # leaves empty stores alone
        _save_manifest(files, table)
    return table


def rebuild_manifest(files: ShardFiles) -> pa.Table:
    """The manifest from scratch (every footer read), written over the cached one."""
    table = _sorted(_manifest_table(files, files.list_shards()))
    _save_manifest(files, table)
    return table


def stats(files: ShardFiles) -> list[PartitionStats]:
    """Shards, episodes, steps and bytes per (task, outcome), from the reconciled manifest."""
    m = manifest(files, refresh=True)
    if m.num_rows == 0:
        return []
    grouped = m.group_by(["task", "outcome"]).aggregate(
        [("path", "count"), ("episodes", "sum"), ("steps", "sum"), ("bytes", "sum")]
    ).sort_by([("task", "ascending"), ("outcome", "ascending")])
    return [
        PartitionStats(r["task"], r["outcome"], r["path_count"], r["episodes_sum"], r["steps_sum"], r["bytes_sum"])
        for r in grouped.to_pylist()
    ]


def format_stats(files: ShardFiles) -> str:
    """Per-partition counts as a text table with a total line, for ``afil-ray replay stats DIR``."""
    rows = stats(files)
    quarantined = list_quarantined(files)
    if not rows:
        text = f"no replay shards under {files.root}"
    else:
        header = ("task", "outcome", "shards", "episodes", "steps", "MiB")
        body = [(r.task, r.outcome, f"{r.shards:,}", f"{r.episodes:,}", f"{r.steps:,}",
                 f"{r.bytes / 2**20:,.1f}") for r in rows]
        body.append(("total", "", f"{sum(r.shards for r in rows):,}", f"{sum(r.episodes for r in rows):,}",
                     f"{sum(r.steps for r in rows):,}", f"{sum(r.bytes for r in rows) / 2**20:,.1f}"))
        widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]

        def fmt(line: tuple[str, ...]) -> str:
            cells = [c.ljust(w) if i < 2 else c.rjust(w)
                     for i, (c, w) in enumerate(zip(line, widths, strict=True))]
            return "  ".join(cells).rstrip()

        lines = [fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body[:-1]),
                 "  ".join("-" * w for w in widths), fmt(body[-1])]
        text = "\n".join(lines)
    if quarantined:
        text += f"\n{len(quarantined)} corrupt shard(s) in {files.abspath(QUARANTINE_DIR)}"
    return text


# ---------------------------------------------------------------- retention and clean-up


def _episodes_in(files: ShardFiles, shard: ShardFile) -> int | None:
    if shard.path not in files.episode_counts and _footer_row(files, shard) is None:
        return None
    return files.episode_counts[shard.path]


def apply_retention(
    files: ShardFiles, capacity: int | None, task: Selection = None, outcome: Selection = None
) -> list[str]:
    """Delete the oldest shards of each partition beyond ``capacity`` episodes (None: keep everything).

    Shards are kept newest first until they hold at least the capacity, so a partition keeps between
    ``capacity`` and ``capacity + episodes_per_shard - 1`` episodes (never fewer than it has, up to the
    capacity). Returns the removed relative paths. Safe to run from many writers at once.
    """
    if capacity is None:
        return []
    removed: list[str] = []
    by_partition: dict[tuple[str, str], list[ShardFile]] = {}
    for s in files.list_shards(task, outcome):
        by_partition.setdefault((s.task, s.outcome), []).append(s)
    for shards in by_partition.values():
        kept = 0
        for shard in reversed(shards):  # newest first
            if kept < capacity:
                kept += _episodes_in(files, shard) or 0
                continue
            try:
                files.delete(shard.path)
                removed.append(shard.path)
            except FileNotFoundError:  # another writer retired it first
                pass
            files.episode_counts.pop(shard.path, None)
    if removed:
        log.info("replay retention removed %d shard(s) beyond %d episodes per partition", len(removed), capacity)
    return removed


def discard_writer(files: ShardFiles, writer_id: str) -> list[str]:
    """Delete every shard ``writer_id`` committed: what a unit of work wrote before a stop cut it short, so that
    its rerun does not store the same episodes twice. Returns the removed relative paths."""
    table = manifest(files, refresh=True)
    removed = []
    for path, writer in zip(table["path"].to_pylist(), table["writer_id"].to_pylist(), strict=True):
        if writer == writer_id:
            try:
                files.delete(path)
                removed.append(path)
            except FileNotFoundError:
                pass
            files.episode_counts.pop(path, None)
    if removed:
        log.warning("replay: removed %d shard(s) of the unfinished writer %s", len(removed), writer_id)
    return removed


def clean_stale_temps(files: ShardFiles, older_than_s: float = 3600.0) -> list[str]:
    """Delete '.'-prefixed temporaries left by writers that died mid-write, if older than ``older_than_s``
    (young ones may belong to a live writer). Returns the removed relative paths."""
    cutoff = time.time_ns() - int(older_than_s * 1e9)
    removed = []
    for entry in files.walk():
        name = entry.path.rsplit("/", 1)[-1]
        if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
            continue
        if entry.mtime_ns is not None and entry.mtime_ns > cutoff:
            continue
        try:
            files.delete(entry.path)
            removed.append(entry.path)
        except FileNotFoundError:
            pass
    return removed
