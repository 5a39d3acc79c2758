"""Arrow replay store: episode shards as Arrow IPC files, partitioned hive-style by task and outcome.

Layout under the root (a local path or any ``pyarrow.fs`` URI)::

    task=<task>/outcome=<outcome>/<created_ns>-<host>-<pid>-<uuid8>.arrow   shards, immutable once visible
    _manifest.arrow                                                         rebuildable cache of shard facts
    _quarantine/task=.../outcome=.../<name>.arrow                           corrupt shards, moved aside

Many writers (processes, Ray actors on many nodes) share one root. Each shard gets a unique name and becomes
visible only by a rename of a finished, fsynced temporary file whose name starts with '.', so readers
never see half a shard and ``pyarrow.dataset`` skips the temporaries ('.' and '_' prefixes are ignored).
The manifest is the only shared mutable file; it is a cache that any reader can reconcile or rebuild, so
last writer wins.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import time
import uuid
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from afil_ray.config import ReplayConfig
from afil_ray.replay.episode import BASE_SCHEMA, OUTCOMES, Episode, episodes_to_table, table_to_episodes

log = logging.getLogger(__name__)

SHARD_SUFFIX = ".arrow"
TEMP_SUFFIX = ".tmp"
MANIFEST_NAME = "_manifest.arrow"
QUARANTINE_DIR = "_quarantine"
COMPRESSIONS = ("none", "lz4", "zstd")
FORMAT_VERSION = "1"

# Keys of the shard schema metadata (footer) and of the record batch metadata.
META_EPISODES = b"afil_ray.episodes"
META_STEPS = b"afil_ray.steps"
META_TASK = b"afil_ray.task"
META_OUTCOME = b"afil_ray.outcome"
META_CREATED_NS = b"afil_ray.created_ns"
META_WRITER = b"afil_ray.writer_id"
META_FORMAT = b"afil_ray.format"
META_COMPRESSION = b"afil_ray.compression"
META_CRC32 = b"afil_ray.crc32"  # of the batch's uncompressed IPC serialisation: catches flipped payload bytes

PARTITION_SCHEMA = pa.schema([pa.field("task", pa.string()), pa.field("outcome", pa.string())])

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

_HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"
_SHARD_NAME = re.compile(r"^(\d+)-.+\.arrow$")

Selection = str | Iterable[str] | None


class ShardCorruptError(ValueError):
    """A shard that opens but whose contents contradict its own metadata or checksum."""


# What reading a damaged shard raises (pyarrow reports some footer damage as a plain OSError).
# FileNotFoundError is an OSError too but means the shard was retired or quarantined by someone else:
# callers test for it first.
CORRUPTION_ERRORS = (pa.ArrowException, OSError, ShardCorruptError)


@dataclass(frozen=True)
class ShardFile:
    """A complete shard as the directory listing shows it (found without opening the file)."""

    path: str  # relative to the store root, '/'-separated
    task: str
    outcome: str
    created_ns: int
    bytes: int


@dataclass(frozen=True)
class CorruptShard:
    """A shard that failed to open or validate, and where it was moved to (None if it had already gone)."""

    path: str
    reason: str
    moved_to: str | None


@dataclass(frozen=True)
class PartitionStats:
    task: str
    outcome: str
    shards: int
    episodes: int
    steps: int
    bytes: int


@dataclass(frozen=True)
class _StagedShard:
    tmp: str  # the written temporary, not yet durable or visible
    shard: ShardFile  # what it becomes once committed


@dataclass(frozen=True)
class _Entry:
    path: str  # relative to the root
    size: int
    mtime_ns: int | None


def selection_set(selection: Selection) -> frozenset[str] | None:
    """A task/outcome selection as a set; None selects everything, a bare string is one name (not letters)."""
    if selection is None:
        return None
    if isinstance(selection, str):
        return frozenset([selection])
    return frozenset(selection)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(path: str) -> None:
    """``os.makedirs`` that fsyncs each parent it added an entry to, so a new partition survives a crash."""
    created = []
    p = path
    while not os.path.isdir(p):
        created.append(p)
        p = os.path.dirname(p)
    if not created:
        return
    os.makedirs(path, exist_ok=True)
    for d in reversed(created):
        _fsync_path(os.path.dirname(d))


def _batch_crc32(batch: pa.RecordBatch) -> int:
    return zlib.crc32(batch.serialize())


def partition_dir(task: str, outcome: str) -> str:
    """Relative directory of a partition; the task is percent-encoded the way hive partitioning decodes it."""
    return f"task={quote(task, safe='')}/outcome={quote(outcome, safe='')}"


class ReplayStore:
    """A directory of episode shards. Cheap to construct; every method re-reads the directory, so one store
    object sees what other processes wrote in the meantime."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        episodes_per_shard: int = 32,
        compression: str = "none",
        capacity_per_partition: int | None = None,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"replay compression must be one of {COMPRESSIONS}, got {compression!r}")
        if episodes_per_shard < 1:
            raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
        if capacity_per_partition is not None and capacity_per_partition < 1:
            raise ValueError(f"capacity_per_partition must be >= 1 or None, got {capacity_per_partition}")
        root = os.fspath(root)
        if filesystem is not None:
            self.fs, self.root = filesystem, root.rstrip("/")
        elif "://" in root:
            self.fs, path = pafs.FileSystem.from_uri(root)
            self.root = path.rstrip("/")
        else:
            self.fs, self.root = pafs.LocalFileSystem(), os.path.abspath(root)
        # Local roots get os-level fsync + rename and memory-mapped reads; others go through pyarrow.fs.
        self.is_local = isinstance(self.fs, pafs.LocalFileSystem)
        self.episodes_per_shard = episodes_per_shard
        self.compression = compression
        self.capacity_per_partition = capacity_per_partition
        self.quarantined: list[CorruptShard] = []  # what this object moved aside, in order
        self._episode_counts: dict[str, int] = {}  # footer facts of immutable shards, for retention

    @classmethod
    def from_config(cls, cfg: ReplayConfig, filesystem: pafs.FileSystem | None = None) -> ReplayStore:
        return cls(
            cfg.root,
            episodes_per_shard=cfg.episodes_per_shard,
            compression=cfg.compression,
            capacity_per_partition=cfg.capacity_per_partition,
            filesystem=filesystem,
        )

    def __repr__(self) -> str:
        return f"ReplayStore({self.root!r}, compression={self.compression!r})"

    # ---------------------------------------------------------------- paths and raw file access

    def abspath(self, rel: str) -> str:
        """Path of ``rel`` on the store's filesystem."""
        return f"{self.root}/{rel}" if rel else self.root

    def open_input(self, rel: str) -> pa.NativeFile:
        """Memory-mapped on local roots (uncompressed shards read zero-copy), else a random access file."""
        if self.is_local:
            return pa.memory_map(self.abspath(rel))
        return self.fs.open_input_file(self.abspath(rel))

    def shard_schema(self, rel: str) -> pa.Schema:
        """A shard's schema and metadata, from its footer alone."""
        with self.open_input(rel) as f:
            return ipc.open_file(f).schema

    def _walk(self) -> list[_Entry]:
        """Files at the root and in partition directories; tolerant of files vanishing during the walk."""
        if not self.is_local:
            infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True, allow_not_found=True))
            out = []
            for info in infos:
                if info.type != pafs.FileType.File:
                    continue
                rel = info.path[len(self.root) + 1:]
                parts = rel.split("/")
                if len(parts) == 1 or (len(parts) == 3 and parts[0].startswith("task=")
                                       and parts[1].startswith("outcome=")):
                    out.append(_Entry(rel, info.size or 0, info.mtime_ns))
            return out
        return list(self._walk_local())

    def _walk_local(self) -> Iterator[_Entry]:
        def files(directory: str, rel: str) -> Iterator[_Entry]:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                return
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        yield _Entry(f"{rel}{e.name}", st.st_size, st.st_mtime_ns)
                except FileNotFoundError:
                    continue

        def subdirs(directory: str, prefix: str) -> list[str]:
            try:
                return [e.name for e in os.scandir(directory) if e.name.startswith(prefix) and e.is_dir()]
            except FileNotFoundError:
                return []

        yield from files(self.root, "")
        for task_dir in subdirs(self.root, "task="):
            for outcome_dir in subdirs(f"{self.root}/{task_dir}", "outcome="):
                yield from files(f"{self.root}/{task_dir}/{outcome_dir}", f"{task_dir}/{outcome_dir}/")

    @staticmethod
    def _parse_shard(entry: _Entry) -> ShardFile | None:
        parts = entry.path.split("/")
        if len(parts) != 3 or not parts[2].endswith(SHARD_SUFFIX) or parts[2][0] in "._":
            return None
        m = _SHARD_NAME.match(parts[2])
        created_ns = int(m.group(1)) if m else (entry.mtime_ns or 0)  # foreign file names: fall back to mtime
        return ShardFile(entry.path, unquote(parts[0][len("task="):]), unquote(parts[1][len("outcome="):]),
                         created_ns, entry.size)

    def list_shards(self, task: Selection = None, outcome: Selection = None) -> list[ShardFile]:
        """Complete shards, oldest first per partition; temporaries and quarantined files never appear."""
        tasks, outcomes = selection_set(task), selection_set(outcome)
        shards = []
        for entry in self._walk():
            s = self._parse_shard(entry)
            if s and (tasks is None or s.task in tasks) and (outcomes is None or s.outcome in outcomes):
                shards.append(s)
        shards.sort(key=lambda s: (s.task, s.outcome, s.created_ns, s.path))
        return shards

    def _write_temp(self, rel: str, write: Callable[[pa.NativeFile], None]) -> str:
        """Write via ``write(sink)`` to a '.'-prefixed temporary beside ``rel``; returns its path."""
        directory, name = self.abspath(rel).rsplit("/", 1)
        tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}{TEMP_SUFFIX}"
        try:
            if self.is_local:
                _makedirs_durable(directory)
                with pa.OSFile(tmp, "wb") as sink:
                    write(sink)
            else:
                self.fs.create_dir(directory, recursive=True)
                with self.fs.open_output_stream(tmp) as sink:
                    write(sink)
        except BaseException:
            self._discard(tmp)
            raise
        return tmp

    def _commit_temp(self, tmp: str, rel: str) -> None:
        """Make a temporary durable and visible under ``rel``: fsync, rename, fsync the directory."""
        final = self.abspath(rel)
        try:
            if self.is_local:
                _fsync_path(tmp)
                os.replace(tmp, final)
                _fsync_path(final.rsplit("/", 1)[0])
            else:
                self.fs.move(tmp, final)
        except BaseException:
            self._discard(tmp)
            raise

    def _discard(self, tmp: str) -> None:
        try:
            if self.is_local:
                os.unlink(tmp)
            else:
                self.fs.delete_file(tmp)
        except OSError:
            pass

    def _write_atomic(self, rel: str, write: Callable[[pa.NativeFile], None]) -> None:
        self._commit_temp(self._write_temp(rel, write), rel)

    # ---------------------------------------------------------------- writing

    def writer(self, writer_id: str | None = None, *, max_pending: int = 2) -> ReplayWriter:
        return ReplayWriter(self, writer_id, max_pending=max_pending)

    def write_episodes(self, episodes: Iterable[Episode], writer_id: str | None = None) -> list[ShardFile]:
        """Write episodes and flush everything (for producers that already hold a finished batch)."""
        with self.writer(writer_id) as w:
            for ep in episodes:
                w.add(ep)
        return w.shards_written

    def write_shard(self, episodes: list[Episode], writer_id: str) -> ShardFile:
        """One durable, visible shard from episodes of one partition (no retention: the writer does that)."""
        staged = self._stage_shard(episodes, writer_id)
        self._commit_temp(staged.tmp, staged.shard.path)
        return staged.shard

    def _stage_shard(self, episodes: list[Episode], writer_id: str) -> _StagedShard:
        """Convert and write a shard to its temporary; :meth:`_commit_temp` makes it durable and visible."""
        task, outcome = episodes[0].task, episodes[0].outcome
        for ep in episodes:
            if (ep.task, ep.outcome) != (task, outcome):
                raise ValueError(f"one shard holds one partition: got {ep.task}/{ep.outcome} "
                                 f"with {task}/{outcome}")
        table = episodes_to_table(episodes)
        created_ns = time.time_ns()
        name = f"{created_ns}-{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
        rel = f"{partition_dir(task, outcome)}/{name}"
        steps = int(pc.sum(table["length"]).as_py() or 0)
        schema = table.schema.with_metadata(
            {
                META_EPISODES: str(table.num_rows),
                META_STEPS: str(steps),
                META_TASK: task,
                META_OUTCOME: outcome,
                META_CREATED_NS: str(created_ns),
                META_WRITER: writer_id,
                META_FORMAT: FORMAT_VERSION,
                META_COMPRESSION: self.compression,
            }
        )
        batch = pa.RecordBatch.from_arrays(table.combine_chunks().to_batches()[0].columns, schema=schema)
        crc = _batch_crc32(batch)
        options = ipc.IpcWriteOptions(compression=None if self.compression == "none" else self.compression)
        size = 0

        def write(sink: pa.NativeFile) -> None:
            nonlocal size
            with ipc.new_file(sink, schema, options=options) as w:
                w.write_batch(batch, custom_metadata={META_CRC32: str(crc)})
            size = sink.tell()

        tmp = self._write_temp(rel, write)
        self._episode_counts[rel] = table.num_rows
        return _StagedShard(tmp, ShardFile(rel, task, outcome, created_ns, size))

    # ---------------------------------------------------------------- reading and checking shards

    def quarantine(self, rel: str, reason: str) -> CorruptShard:
        """Move a shard to ``_quarantine/<same relative path>`` (never delete it) and report it."""
        dest = f"{QUARANTINE_DIR}/{rel}"
        try:
            if self.is_local:
                os.makedirs(os.path.dirname(self.abspath(dest)), exist_ok=True)
                if os.path.exists(self.abspath(dest)):
                    dest = f"{dest}.{uuid.uuid4().hex[:8]}"
                os.rename(self.abspath(rel), self.abspath(dest))
            else:
                self.fs.create_dir(self.abspath(dest).rsplit("/", 1)[0], recursive=True)
                self.fs.move(self.abspath(rel), self.abspath(dest))
            moved_to: str | None = dest
        except FileNotFoundError:  # another process moved or retired it first
            moved_to = None
        record = CorruptShard(rel, reason, moved_to)
        log.warning("replay shard %s is corrupt (%s); %s", self.abspath(rel), reason,
                    f"moved to {self.abspath(moved_to)}" if moved_to else "it had already gone")
        self.quarantined.append(record)
        self._episode_counts.pop(rel, None)
        return record

    def list_quarantined(self) -> list[str]:
        """Relative paths of everything in ``_quarantine`` (moved aside by any process, any time)."""
        base = f"{self.root}/{QUARANTINE_DIR}"
        infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(self.root) + 1:] for i in infos if i.type == pafs.FileType.File)

    def _footer_row(self, shard: ShardFile) -> dict[str, Any] | None:
        """Manifest facts from a shard's footer alone; None if the shard vanished or was quarantined."""
        try:
            f = self.open_input(shard.path)
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
            self.quarantine(shard.path, f"{type(e).__name__}: {e}")
            return None
        self._episode_counts[shard.path] = episodes
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

    def read_shard(self, rel: str, columns: list[str] | None = None, *, verify: bool = True) -> pa.Table:
        """A shard's rows (zero-copy from the memory map when uncompressed), checked against its own metadata.

        Always: the file opens, every batch passes ``validate(full=True)``, the row count matches the footer.
        With ``verify`` and all columns: each batch matches the checksum recorded when it was written.
        Raises FileNotFoundError if the shard has gone and ShardCorruptError / pyarrow errors if it is
        damaged; :meth:`read_checked` turns the latter into quarantine.
        """
        with self.open_input(rel) as f:
            reader = ipc.open_file(f)
            schema = reader.schema
            md = schema.metadata or {}
            if columns is not None:
                missing = [c for c in columns if schema.get_field_index(c) < 0]
                if missing:
                    raise KeyError(f"shard {rel} has no column(s) {missing}")
            # pyarrow copies the buffers it reads with included_fields, even from a memory map, so columns are
            # picked that way only where a whole read would cost more: compressed or remote shards.
            zero_copy = self.is_local and md.get(META_COMPRESSION, b"none") == b"none"
            if columns is not None and not zero_copy:
                reader = ipc.open_file(f, options=ipc.IpcReadOptions(
                    included_fields=[schema.get_field_index(c) for c in columns]))
            batches = []
            for i in range(reader.num_record_batches):
                batch, batch_md = reader.get_batch_with_custom_metadata(i)
                if columns is not None:
                    batch = batch.select(columns)
                batch.validate(full=True)
                if verify and columns is None and batch_md is not None and META_CRC32 in batch_md:
                    crc, recorded = _batch_crc32(batch), int(batch_md[META_CRC32])
                    if crc != recorded:
                        raise ShardCorruptError(f"batch {i} checksum {crc} != recorded {recorded}")
                batches.append(batch)
        table = pa.Table.from_batches(batches, schema=schema if columns is None else
                                      pa.schema([schema.field(c) for c in columns], metadata=md))
        if META_EPISODES in md and table.num_rows != int(md[META_EPISODES]):
            raise ShardCorruptError(f"{table.num_rows} rows, metadata says {int(md[META_EPISODES])} episodes")
        return table

    def read_checked(
        self, rel: str, columns: list[str] | None = None, *, verify: bool = True
    ) -> pa.Table | None:
        """:meth:`read_shard`, quarantining a damaged shard; None if it is damaged or has gone."""
        try:
            return self.read_shard(rel, columns, verify=verify)
        except FileNotFoundError:
            return None
        except KeyError:
            raise
        except CORRUPTION_ERRORS as e:
            self.quarantine(rel, f"{type(e).__name__}: {e}")
            return None

    def verify(self, task: Selection = None, outcome: Selection = None) -> list[CorruptShard]:
        """Read every shard in full (checksums included), quarantine the damaged ones and return them."""
        before = len(self.quarantined)
        for shard in self.list_shards(task, outcome):
            self.read_checked(shard.path)
        return self.quarantined[before:]

    def read_episodes(self, task: Selection = None, outcome: Selection = None) -> list[Episode]:
        """Episodes as Python objects, oldest shard first per partition: for small reads, not training."""
        episodes: list[Episode] = []
        for shard in self.list_shards(task, outcome):
            table = self.read_checked(shard.path)
            if table is not None:
                episodes.extend(table_to_episodes(table))
        return episodes

    # ---------------------------------------------------------------- manifest, stats, dataset

    def _load_manifest(self) -> pa.Table | None:
        try:
            with self.open_input(MANIFEST_NAME) as f:
                table = ipc.open_file(f).read_all()
        except FileNotFoundError:
            return None
        except (pa.ArrowException, OSError) as e:
            log.warning("replay manifest %s is unreadable (%s); rebuilding it",
                        self.abspath(MANIFEST_NAME), e)
            return None
        if not table.schema.equals(MANIFEST_SCHEMA):
            log.info("replay manifest %s has an older layout; rebuilding it", self.abspath(MANIFEST_NAME))
            return None
        return table

    def _save_manifest(self, table: pa.Table) -> None:
        def write(sink: pa.NativeFile) -> None:
            with ipc.new_file(sink, MANIFEST_SCHEMA) as w:
                w.write_table(table)

        self._write_atomic(MANIFEST_NAME, write)

    def _manifest_table(self, rows: list[dict[str, Any]]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=MANIFEST_SCHEMA)

    @staticmethod
    def _sorted(table: pa.Table) -> pa.Table:
        return table.sort_by([("task", "ascending"), ("outcome", "ascending"), ("created", "ascending"),
                              ("path", "ascending")])

    def manifest(self, refresh: bool = True) -> pa.Table:
        """One row per shard (path, task, outcome, episodes, steps, bytes, created, writer_id, arrow_schema).

        With ``refresh`` the cached ``_manifest.arrow`` is reconciled against the directory: footers are read
        only for shards it does not know, vanished shards are dropped, and it is written back if it changed.
        """
        cached = self._load_manifest()
        if cached is not None and not refresh:
            return cached
        shards = self.list_shards()
        if cached is None:
            kept, new = self._manifest_table([]), shards
        else:
            listing = pa.table({"path": pa.array([s.path for s in shards], pa.string()),
                                "bytes": pa.array([s.bytes for s in shards], pa.int64())})
            kept = cached.join(listing, keys=["path", "bytes"], join_type="left semi")
            kept = kept.select(MANIFEST_SCHEMA.names)
            known = set(kept["path"].to_pylist())
            new = [s for s in shards if s.path not in known]
        rows = [r for r in (self._footer_row(s) for s in new) if r is not None]
        table = self._sorted(pa.concat_tables([kept.cast(MANIFEST_SCHEMA), self._manifest_table(rows)]))
        if rows or (cached is not None and kept.num_rows != cached.num_rows):  # leaves empty stores alone
            self._save_manifest(table)
        return table

    def rebuild_manifest(self) -> pa.Table:
        """The manifest from scratch (every footer read), written over the cached one."""
        rows = [r for r in (self._footer_row(s) for s in self.list_shards()) if r is not None]
        table = self._sorted(self._manifest_table(rows))
        self._save_manifest(table)
        return table

    def stats(self) -> list[PartitionStats]:
        """Shards, episodes, steps and bytes per (task, outcome), from the reconciled manifest."""
        m = self.manifest(refresh=True)
        if m.num_rows == 0:
            return []
        grouped = m.group_by(["task", "outcome"]).aggregate(
            [("path", "count"), ("episodes", "sum"), ("steps", "sum"), ("bytes", "sum")]
        ).sort_by([("task", "ascending"), ("outcome", "ascending")])
        return [
            PartitionStats(r["task"], r["outcome"], r["path_count"], r["episodes_sum"], r["steps_sum"],
                           r["bytes_sum"])
            for r in grouped.to_pylist()
        ]

    def dataset(self) -> ds.Dataset:
        """All shards as one ``pyarrow.dataset`` with hive partitioning and a schema unified across shards
        (image columns that some shards lack read as null there). Filters on task/outcome prune shards."""
        m = self.manifest(refresh=True)
        blobs = {b for b in m["arrow_schema"].to_pylist() if b}
        schemas = [ipc.read_schema(pa.py_buffer(b)) for b in sorted(blobs)]
        # BASE_SCHEMA first keeps the documented column order whatever the shards hold.
        schema = pa.unify_schemas([BASE_SCHEMA, *schemas])
        return ds.dataset(
            [self.abspath(p) for p in m["path"].to_pylist()],
            schema=schema,
            format="ipc",
            filesystem=self.fs,
            partitioning=ds.partitioning(PARTITION_SCHEMA, flavor="hive"),
            partition_base_dir=self.root,
        )

    # ---------------------------------------------------------------- housekeeping

    def _episodes_in(self, shard: ShardFile) -> int | None:
        if shard.path not in self._episode_counts and self._footer_row(shard) is None:
            return None
        return self._episode_counts[shard.path]

    def apply_retention(self, task: Selection = None, outcome: Selection = None) -> list[str]:
        """Delete the oldest shards of each partition beyond ``capacity_per_partition`` episodes.

        Shards are kept newest first until they hold at least the capacity, so a partition keeps between
        ``capacity`` and ``capacity + episodes_per_shard - 1`` episodes (never fewer than it has, up to the
        capacity). Returns the removed relative paths. Safe to run from many writers at once.
        """
        capacity = self.capacity_per_partition
        if capacity is None:
            return []
        removed: list[str] = []
        by_partition: dict[tuple[str, str], list[ShardFile]] = {}
        for s in self.list_shards(task, outcome):
            by_partition.setdefault((s.task, s.outcome), []).append(s)
        for shards in by_partition.values():
            kept = 0
            for shard in reversed(shards):  # newest first
                if kept < capacity:
                    kept += self._episodes_in(shard) or 0
                    continue
                try:
                    if self.is_local:
                        os.unlink(self.abspath(shard.path))
                    else:
                        self.fs.delete_file(self.abspath(shard.path))
                    removed.append(shard.path)
                except FileNotFoundError:  # another writer retired it first
                    pass
                self._episode_counts.pop(shard.path, None)
        if removed:
            log.info("replay retention removed %d shard(s) beyond %d episodes per partition",
                     len(removed), capacity)
        return removed

    def clean_stale_temps(self, older_than_s: float = 3600.0) -> list[str]:
        """Delete '.'-prefixed temporaries left by writers that died mid-write, if older than ``older_than_s``
        (young ones may belong to a live writer). Returns the removed relative paths."""
        cutoff = time.time_ns() - int(older_than_s * 1e9)
        removed = []
        for entry in self._walk():
            name = entry.path.rsplit("/", 1)[-1]
            if not (name.startswith(".") and name.endswith(TEMP_SUFFIX)):
                continue
            if entry.mtime_ns is not None and entry.mtime_ns > cutoff:
                continue
            try:
                if self.is_local:
                    os.unlink(self.abspath(entry.path))
                else:
                    self.fs.delete_file(self.abspath(entry.path))
                removed.append(entry.path)
            except FileNotFoundError:
                pass
        return removed


class ReplayWriter:
    """Buffers episodes per partition and writes a shard whenever one partition has ``episodes_per_shard``.

    A shard is converted and written to its temporary in the caller's thread; the fsync, rename and (with a
    capacity) retention run on a background thread, so the next shard's work overlaps the disk's. At most
    ``max_pending`` shards wait for it (0: commit before returning). A shard is visible to readers once
    committed, at the latest when :meth:`flush` or :meth:`close` returns. Episodes with different camera
    sets go to different shards of the same partition. Use as a context manager, or call :meth:`close`;
    buffered episodes are written on exit even when the block raised.
    """

    def __init__(self, store: ReplayStore, writer_id: str | None = None, *, max_pending: int = 2) -> None:
        self.store = store
        self.writer_id = writer_id or f"{_HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.max_pending = max_pending
        self.shards_written: list[ShardFile] = []  # committed: durable and visible
        self.episodes_written = 0
        self._buffers: dict[tuple[str, str, tuple[str, ...]], list[Episode]] = {}
        self._commits: deque[Future[None]] = deque()
        self._committer: ThreadPoolExecutor | None = None
        self._closed = False

    def add(self, episode: Episode) -> list[ShardFile]:
        """Buffer one episode; returns the shard it completed, if any (committed shortly after)."""
        if self._closed:
            raise RuntimeError("ReplayWriter.add after close")
        if episode.outcome not in OUTCOMES:
            raise ValueError(f"episode outcome must be one of {OUTCOMES}, got {episode.outcome!r}")
        key = (episode.task, episode.outcome, tuple(sorted(episode.images)))
        buffer = self._buffers.setdefault(key, [])
        buffer.append(episode)
        if len(buffer) >= self.store.episodes_per_shard:
            return [self._stage(key)]
        return []

    @property
    def pending(self) -> int:
        """Episodes buffered and not yet written."""
        return sum(len(b) for b in self._buffers.values())

    def _stage(self, key: tuple[str, str, tuple[str, ...]]) -> ShardFile:
        episodes = self._buffers[key]
        staged = self.store._stage_shard(episodes, self.writer_id)
        del self._buffers[key]  # only once written: a failed write keeps the episodes for a retry
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix=f"replay-commit-{self.writer_id}")
        self._commits.append(self._committer.submit(self._commit, staged, len(episodes)))
        while len(self._commits) > self.max_pending:
            self._commits.popleft().result()  # re-raises a failed commit here, in the producer
        return staged.shard

    def _commit(self, staged: _StagedShard, episodes: int) -> None:
        self.store._commit_temp(staged.tmp, staged.shard.path)
        self.shards_written.append(staged.shard)
        self.episodes_written += episodes
        if self.store.capacity_per_partition is not None:
            self.store.apply_retention(task=staged.shard.task, outcome=staged.shard.outcome)

    def flush(self) -> list[ShardFile]:
        """Write every non-empty buffer as a shard, however few episodes it holds, and wait until all shards
        are durable and visible. Returns the shards this call wrote."""
        written = [self._stage(key) for key in list(self._buffers)]
        while self._commits:
            self._commits.popleft().result()
        return written

    def close(self) -> list[ShardFile]:
        try:
            return self.flush()
        finally:
            self._closed = True
            if self._committer is not None:
                self._committer.shutdown(wait=True)

    def __enter__(self) -> ReplayWriter:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close()
            return
        try:  # finished episodes are still good data; do not let a second error hide the first
            self.close()
        except Exception:
            log.exception("replay writer %s could not flush %d episode(s) after an error", self.writer_id,
                          self.pending)


def format_stats(store: ReplayStore) -> str:
    """Per-partition counts as a text table with a total line, for ``afil-ray replay stats DIR``."""
    rows = store.stats()
    quarantined = store.list_quarantined()
    if not rows:
        text = f"no replay shards under {store.root}"
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
        text += f"\n{len(quarantined)} corrupt shard(s) in {store.abspath(QUARANTINE_DIR)}"
    return text
