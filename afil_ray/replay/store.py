"""Arrow replay store: episode shards as Arrow IPC files, partitioned hive-style by task and outcome.

:class:`ReplayStore` is what the rest of the code holds: the settings of a root (from :class:`ReplayConfig`),
the buffered :class:`ReplayWriter`, reading episodes back and the whole root as a ``pyarrow.dataset``.
Below it, :mod:`afil_ray.replay.shard_io` writes and reads the shard files (layout, atomic writes, format,
checksums) and :mod:`afil_ray.replay.maintenance` looks after them (manifest, stats, retention, quarantine,
clean-up); the store offers the latter as methods so callers need hold only the store.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import uuid
from collections import Counter, deque
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.ipc as ipc

from afil_ray.config import ReplayConfig
from afil_ray.replay import maintenance
from afil_ray.replay.episode import BASE_SCHEMA, OUTCOMES, Episode, table_to_episodes
from afil_ray.replay.maintenance import PartitionStats
from afil_ray.replay.shard_io import HOST, PARTITION_SCHEMA, CorruptShard, Selection, ShardFile, ShardFiles, StagedShard

log = logging.getLogger(__name__)


class ReplayStore(ShardFiles):
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
        super().__init__(root, compression=compression, filesystem=filesystem)
        if episodes_per_shard < 1:
            raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
        if capacity_per_partition is not None and capacity_per_partition < 1:
            raise ValueError(f"capacity_per_partition must be >= 1 or None, got {capacity_per_partition}")
        self.episodes_per_shard = episodes_per_shard
        self.capacity_per_partition = capacity_per_partition

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

    # ---------------------------------------------------------------- writing

    def writer(self, writer_id: str | None = None, *, max_pending: int = 2, run_id: str = "") -> ReplayWriter:
        return ReplayWriter(self, writer_id, max_pending=max_pending, run_id=run_id)

    def write_episodes(self, episodes: Iterable[Episode], writer_id: str | None = None,
                       run_id: str = "") -> list[ShardFile]:
        """Write episodes and flush everything (for producers that already hold a finished batch)."""
        with self.writer(writer_id, run_id=run_id) as w:
            for ep in episodes:
                w.add(ep)
        return w.shards_written

    def write_shard(self, episodes: list[Episode], writer_id: str) -> ShardFile:
        """One durable, visible shard from episodes of one partition (no retention: the writer does that)."""
        staged = self.stage_shard(episodes, writer_id)
        self.commit_temp(staged.tmp, staged.shard.path)
        return staged.shard

    # ---------------------------------------------------------------- reading

    def read_checked(
        self, rel: str, columns: list[str] | None = None, *, verify: bool = True
    ) -> pa.Table | None:
        """:meth:`read_shard`, quarantining a damaged shard; None if it is damaged or has gone."""
        return maintenance.read_checked(self, rel, columns, verify=verify)

    def read_episodes(self, task: Selection = None, outcome: Selection = None) -> list[Episode]:
        """Episodes as Python objects, oldest shard first per partition: for small reads, not training."""
        episodes: list[Episode] = []
        for shard in self.list_shards(task, outcome):
            table = self.read_checked(shard.path)
            if table is not None:
                episodes.extend(table_to_episodes(table))
        return episodes

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

    def episodes_of_run(self, run_id: str) -> dict[str, int]:
        """Episodes one run stored, per outcome (from the ``run_id`` column; shards older than it count for none)."""
        if not len(self.manifest(refresh=True)):
            return {}
        table = self.dataset().to_table(columns=["outcome"], filter=ds.field("run_id") == run_id)
        return dict(Counter(table.column("outcome").to_pylist()))

    # ---------------------------------------------------------------- maintenance (see maintenance.py)

    def manifest(self, refresh: bool = True) -> pa.Table:
        return maintenance.manifest(self, refresh)

    def rebuild_manifest(self) -> pa.Table:
        return maintenance.rebuild_manifest(self)

    def stats(self) -> list[PartitionStats]:
        return maintenance.stats(self)

    def verify(self, task: Selection = None, outcome: Selection = None) -> list[CorruptShard]:
        return maintenance.verify(self, task, outcome)

    def quarantine(self, rel: str, reason: str) -> CorruptShard:
        return maintenance.quarantine(self, rel, reason)

    def list_quarantined(self) -> list[str]:
        return maintenance.list_quarantined(self)

    def apply_retention(self, task: Selection = None, outcome: Selection = None) -> list[str]:
        """Retention at this store's ``capacity_per_partition`` (see :func:`maintenance.apply_retention`)."""
        return maintenance.apply_retention(self, self.capacity_per_partition, task, outcome)

    def discard_writer(self, writer_id: str) -> list[str]:
        return maintenance.discard_writer(self, writer_id)

    def clean_stale_temps(self, older_than_s: float = 3600.0) -> list[str]:
        return maintenance.clean_stale_temps(self, older_than_s)


class ReplayWriter:
    """Buffers episodes per partition and writes a shard whenever one partition has ``episodes_per_shard``.

    A shard is converted and written to its temporary in the caller's thread; the fsync, rename and (with a
    capacity) retention run on a background thread, so the next shard's work overlaps the disk's. At most
    ``max_pending`` shards wait for it (0: commit before returning). A shard is visible to readers once
    committed, at the latest when :meth:`flush` or :meth:`close` returns. Episodes with different camera
    sets go to different shards of the same partition. Use as a context manager, or call :meth:`close`;
    buffered episodes are written on exit even when the block raised. ``run_id`` is stamped on every episode
    that does not carry one, so each stored episode says which run wrote it.
    """

    def __init__(self, store: ReplayStore, writer_id: str | None = None, *, max_pending: int = 2,
                 run_id: str = "") -> None:
        self.store = store
        self.run_id = run_id
        self.writer_id = writer_id or f"{HOST}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
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
        if self.run_id and not episode.run_id:
            episode = dataclasses.replace(episode, run_id=self.run_id)
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
        staged = self.store.stage_shard(episodes, self.writer_id)
        del self._buffers[key]  # only once written: a failed write keeps the episodes for a retry
        if self._committer is None:
            self._committer = ThreadPoolExecutor(1, thread_name_prefix=f"replay-commit-{self.writer_id}")
        self._commits.append(self._committer.submit(self._commit, staged, len(episodes)))
        while len(self._commits) > self.max_pending:
            self._commits.popleft().result()  # re-raises a failed commit here, in the producer
        return staged.shard

    def _commit(self, staged: StagedShard, episodes: int) -> None:
        self.store.commit_temp(staged.tmp, staged.shard.path)
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
