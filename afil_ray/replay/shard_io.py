"""Shard files on disk: the layout, atomic writes, the Arrow IPC shard format and its checksums.

This is the bottom layer of the replay store. It knows where shards live and how their bytes are written
and read, and nothing about the manifest, retention or quarantine (:mod:`afil_ray.replay.maintenance`) or
the buffered writer (:mod:`afil_ray.replay.store`); both build on :class:`ShardFiles`.

Layout under the root (a local path or any ``pyarrow.fs`` URI)::

    task=<task>/outcome=<outcome>/<created_ns>-<host>-<pid>-<uuid8>.arrow   shards, immutable once visible

Many writers (processes, Ray actors on many nodes) share one root. Each shard gets a unique name and becomes
visible only by a rename of a finished, fsynced temporary file whose name starts with '.', so readers
never see half a shard and ``pyarrow.dataset`` skips the temporaries ('.' and '_' prefixes are ignored).
"""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from urllib.parse import quote, unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from afil_ray.replay.episode import Episode, episodes_to_table

SHARD_SUFFIX = ".arrow"
TEMP_SUFFIX = ".tmp"
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

HOST = re.sub(r"[^A-Za-z0-9.]+", "_", socket.gethostname()) or "host"
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
class StagedShard:
    tmp: str  # the written temporary, not yet durable or visible
    shard: ShardFile  # what it becomes once committed


@dataclass(frozen=True)
class FileEntry:
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


class ShardFiles:
    """The shard files under one root: listing, atomic writes, and encoding and checking shards.

    Also holds two facts its users share about this object's view of the root: ``quarantined`` (what it moved
    aside, in order) and ``episode_counts`` (episodes per shard learnt from footers or from writing them;
    shards are immutable, so the counts stay true while the shard exists).
    """

    def __init__(
        self, root: str | os.PathLike[str], *, compression: str = "none", filesystem: pafs.FileSystem | None = None
    ) -> None:
        if compression not in COMPRESSIONS:
            raise ValueError(f"replay compression must be one of {COMPRESSIONS}, got {compression!r}")
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
        self.compression = compression
        self.quarantined: list[CorruptShard] = []
        self.episode_counts: dict[str, int] = {}

    # ---------------------------------------------------------------- paths and listing

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

    def delete(self, rel: str) -> None:
        """Remove one file; FileNotFoundError if it has already gone."""
        if self.is_local:
            os.unlink(self.abspath(rel))
        else:
            self.fs.delete_file(self.abspath(rel))

    def walk(self) -> list[FileEntry]:
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
                    out.append(FileEntry(rel, info.size or 0, info.mtime_ns))
            return out
        return list(self._walk_local())

    def _walk_local(self) -> Iterator[FileEntry]:
        def files(directory: str, rel: str) -> Iterator[FileEntry]:
            try:
                entries = list(os.scandir(directory))
            except FileNotFoundError:
                return
            for e in entries:
                try:
                    if e.is_file(follow_symlinks=False):
                        st = e.stat(follow_symlinks=False)
                        yield FileEntry(f"{rel}{e.name}", st.st_size, st.st_mtime_ns)
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
    def _parse_shard(entry: FileEntry) -> ShardFile | None:
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
        for entry in self.walk():
            s = self._parse_shard(entry)
            if s and (tasks is None or s.task in tasks) and (outcomes is None or s.outcome in outcomes):
                shards.append(s)
        shards.sort(key=lambda s: (s.task, s.outcome, s.created_ns, s.path))
        return shards

    # ---------------------------------------------------------------- atomic writes

    def write_temp(self, rel: str, write: Callable[[pa.NativeFile], None]) -> str:
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

    def commit_temp(self, tmp: str, rel: str) -> None:
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

    def write_atomic(self, rel: str, write: Callable[[pa.NativeFile], None]) -> None:
        self.commit_temp(self.write_temp(rel, write), rel)

    # ---------------------------------------------------------------- the shard format

    def stage_shard(self, episodes: list[Episode], writer_id: str) -> StagedShard:
        """Convert and write a shard to its temporary; :meth:`commit_temp` makes it durable and visible."""
        task, outcome = episodes[0].task, episodes[0].outcome
        for ep in episodes:
            if (ep.task, ep.outcome) != (task, outcome):
                raise ValueError(f"one shard holds one partition: got {ep.task}/{ep.outcome} "
                                 f"with {task}/{outcome}")
        table = episodes_to_table(episodes)
        created_ns = time.time_ns()
        name = f"{created_ns}-{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}{SHARD_SUFFIX}"
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

        tmp = self.write_temp(rel, write)
        self.episode_counts[rel] = table.num_rows
        return StagedShard(tmp, ShardFile(rel, task, outcome, created_ns, size))

    def read_shard(self, rel: str, columns: list[str] | None = None, *, verify: bool = True) -> pa.Table:
        """A shard's rows (zero-copy from the memory map when uncompressed), checked against its own metadata.

        Always: the file opens, every batch passes ``validate(full=True)``, the row count matches the footer.
        With ``verify`` and all columns: each batch matches the checksum recorded when it was written.
        Raises FileNotFoundError if the shard has gone and ShardCorruptError / pyarrow errors if it is
        damaged; ``read_checked`` (:mod:`afil_ray.replay.maintenance`) turns the latter into quarantine.
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
