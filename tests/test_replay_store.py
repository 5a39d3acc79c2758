"""Replay store on real files: round trips, crashes, concurrent writers, corruption, retention, tools."""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.ipc as ipc
import pytest

from afil_ray.config import ReplayConfig
from afil_ray.replay import Episode, ReplayStore, WindowSampler, format_stats, maintenance
from afil_ray.replay.maintenance import MANIFEST_NAME, QUARANTINE_DIR

ARRAY_FIELDS = ("state", "action", "reward", "step_success", "terminated", "truncated", "final_state")
SCALAR_FIELDS = ("episode_id", "task", "outcome", "instruction", "seed", "source", "run_id", "policy_version",
                 "sampler", "sampler_params", "control_mode", "obs_mode", "snapshot_steps", "snapshots",
                 "parent_episode_id", "extra", "created")


def assert_same_episode(got: Episode, want: Episode) -> None:
    for name in SCALAR_FIELDS:
        assert getattr(got, name) == getattr(want, name), name
    for name in ARRAY_FIELDS:
        a, b = getattr(got, name), np.asarray(getattr(want, name))
        assert a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b), name
    assert got.images.keys() == want.images.keys()
    for cam in want.images:
        assert got.images[cam].dtype == np.uint8 and np.array_equal(got.images[cam], want.images[cam]), cam


@pytest.mark.parametrize("compression", ["none", "lz4", "zstd"])
def test_round_trip_is_bit_exact(tmp_path, make_episode, compression):
    store = ReplayStore(tmp_path / "replay", episodes_per_shard=2, compression=compression)
    episodes = [make_episode("PullCube-v1", "demo", length=7 + i, seed=i) for i in range(3)]
    episodes += [make_episode("PullCube-v1", "failure", length=5, cameras=("base", "hand"), seed=10 + i)
                 for i in range(3)]
    episodes[0].parent_episode_id = "abc"
    episodes[1].seed = None
    episodes.append(make_episode("StackCube-v1", "corrected", length=4, snapshots=0, seed=20))

    written = store.write_episodes(episodes)

    assert sum(1 for _ in written) == 5  # 2+1 demo, 2+1 failure, 1 corrected
    back = {ep.episode_id: ep for ep in store.read_episodes()}
    assert back.keys() == {ep.episode_id for ep in episodes}
    for ep in episodes:
        assert_same_episode(back[ep.episode_id], ep)
    assert {ep.episode_id for ep in store.read_episodes(task="PullCube-v1", outcome=["failure"])} == {
        ep.episode_id for ep in episodes[3:6]}


def test_shard_layout_names_and_metadata(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2, compression="zstd")
    with store.writer(writer_id="w-1") as writer:
        assert writer.add(make_episode("Push T/1", "success", length=3)) == []
        [shard] = writer.add(make_episode("Push T/1", "success", length=4, seed=1))
        writer.add(make_episode("Push T/1", "success", length=5, seed=2))
        assert writer.pending == 1
    assert writer.pending == 0 and writer.episodes_written == 3 and len(writer.shards_written) == 2

    name_pattern = r"task=Push%20T%2F1/outcome=success/\d+-[A-Za-z0-9._]+-\d+-[0-9a-f]{8}\.arrow"
    assert re.fullmatch(name_pattern, shard.path)
    assert shard.task == "Push T/1" and shard.bytes == (tmp_path / shard.path).stat().st_size
    with pa.memory_map(str(tmp_path / shard.path)) as f:
        reader = ipc.open_file(f)
        md = reader.schema.metadata
        assert reader.get_batch(0).num_rows == 2
    assert md[b"afil_ray.episodes"] == b"2" and md[b"afil_ray.steps"] == b"7"
    assert md[b"afil_ray.task"] == b"Push T/1" and md[b"afil_ray.outcome"] == b"success"
    assert md[b"afil_ray.writer_id"] == b"w-1" and int(md[b"afil_ray.created_ns"]) == shard.created_ns
    assert not [p for p in tmp_path.rglob(".*")]  # no temporaries left behind


def test_store_from_config_and_bad_settings(tmp_path):
    store = ReplayStore.from_config(ReplayConfig(root=str(tmp_path), episodes_per_shard=4, compression="lz4",
                                                 capacity_per_partition=8))
    assert (store.root, store.episodes_per_shard, store.compression, store.capacity_per_partition) == (
        str(tmp_path), 4, "lz4", 8)
    with pytest.raises(ValueError, match="compression"):
        ReplayStore(tmp_path, compression="gzip")


KILLED_WRITER = textwrap.dedent("""
    import sys
    import numpy as np
    from afil_ray.replay import Episode, ReplayStore

    def episode(snapshot_bytes):
        n = 4
        flags = np.zeros(n, bool)
        return Episode(task="t", outcome="failure", state=np.zeros((n, 3), np.float32),
                       action=np.zeros((n, 2), np.float32), reward=np.zeros(n, np.float32),
                       step_success=flags, terminated=flags, truncated=flags,
                       final_state=np.zeros(3, np.float32), snapshot_steps=list(range(n)),
                       snapshots=[bytes(snapshot_bytes)] * n)

    store = ReplayStore(sys.argv[1], episodes_per_shard=1)
    store.write_episodes([episode(1000)])
    big = episode(48 << 20)  # a ~200 MB shard: writing and fsyncing it takes far longer than a kill
    print("ready", flush=True)
    store.write_episodes([big])
    print("finished", flush=True)
""")


def test_writer_killed_mid_write_leaves_no_partial_shard(tmp_path):
    root = tmp_path / "replay"
    partition = root / "task=t" / "outcome=failure"
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(root)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 60
        while not any(p.name.startswith(".") for p in partition.iterdir()):
            assert time.monotonic() < deadline and proc.poll() is None, "the big write never started"
            time.sleep(0.0005)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
        proc.stdout.close()
    assert proc.returncode == -signal.SIGKILL

    temps = [p for p in partition.iterdir() if p.name.startswith(".")]
    assert len(temps) == 1 and temps[0].name.endswith(".tmp"), "killed before the rename: a temporary remains"
    store = ReplayStore(root)
    [shard] = store.list_shards()
    assert [ep.length for ep in store.read_episodes()] == [4]
    assert store.manifest()["episodes"].to_pylist() == [1] and store.verify() == []
    assert ds.dataset(str(root), format="ipc", partitioning="hive").count_rows() == 1
    assert store.clean_stale_temps(older_than_s=3600) == []  # young: might belong to a live writer
    assert store.clean_stale_temps(older_than_s=0) == [temps[0].relative_to(root).as_posix()]
    assert [p.name for p in partition.iterdir()] == [shard.path.rsplit("/", 1)[1]]


def _write_from_process(root: str, worker: int, count: int) -> None:
    """Spawned writer: ``count`` small episodes alternating between two shared partitions."""
    store = ReplayStore(root, episodes_per_shard=3)
    with store.writer() as writer:
        for i in range(count):
            n = 3 + i % 4
            writer.add(Episode(
                task="shared", outcome=("demo", "failure")[i % 2], state=np.full((n, 4), i, np.float32),
                action=np.full((n, 2), worker, np.float32), reward=np.zeros(n, np.float32),
                step_success=np.zeros(n, bool), terminated=np.zeros(n, bool), truncated=np.zeros(n, bool),
                final_state=np.zeros(4, np.float32), episode_id=f"w{worker}-{i}",
            ))


def test_concurrent_writer_processes_lose_nothing(tmp_path):
    root = str(tmp_path / "replay")
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_from_process, args=(root, w, 25)) for w in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]

    store = ReplayStore(root)
    ids = sorted(ep.episode_id for ep in store.read_episodes())
    assert ids == sorted(f"w{w}-{i}" for w in range(2) for i in range(25))
    assert store.verify() == []
    assert {(s.task, s.outcome): s.episodes for s in store.stats()} == {("shared", "demo"): 26,
                                                                       ("shared", "failure"): 24}


def _corrupt(path: Path, mode: str, payload: bytes = b"") -> None:
    data = bytearray(path.read_bytes())
    if mode == "truncate":
        del data[len(data) // 2:]
    elif mode == "payload":  # flip bytes of a value: the structure stays valid, only the checksum can tell
        at = data.find(payload)
        assert at > 0
        data[at: at + 16] = bytes(b ^ 0xFF for b in data[at: at + 16])
    elif mode == "footer":
        data[-60:-20] = b"\xab" * 40
    path.write_bytes(bytes(data))


def test_corrupt_shards_are_reported_quarantined_and_the_rest_stays_readable(tmp_path, make_episode, caplog):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    episodes = [make_episode("PullCube-v1", "demo", length=40, seed=i, snapshots=4) for i in range(5)]
    shards = store.write_episodes(episodes)
    store.manifest()  # cached before the damage, to check it is reconciled afterwards
    bad = {"truncate": shards[0], "payload": shards[2], "footer": shards[4]}
    for mode, shard in bad.items():
        _corrupt(tmp_path / shard.path, mode, payload=episodes[2].snapshots[1])

    with caplog.at_level(logging.WARNING, logger="afil_ray.replay.maintenance"):
        survivors = store.read_episodes()

    assert [ep.episode_id for ep in survivors] == [episodes[1].episode_id, episodes[3].episode_id]
    reported = {c.path: c for c in store.quarantined}
    assert reported.keys() == {s.path for s in bad.values()}
    assert "checksum" in reported[bad["payload"].path].reason
    for shard in bad.values():
        assert reported[shard.path].moved_to == f"{QUARANTINE_DIR}/{shard.path}"
        assert not (tmp_path / shard.path).exists() and (tmp_path / QUARANTINE_DIR / shard.path).is_file()
        assert any(str(tmp_path / shard.path) in r.getMessage() for r in caplog.records)
    assert store.list_quarantined() == sorted(f"{QUARANTINE_DIR}/{s.path}" for s in bad.values())
    assert store.manifest()["path"].to_pylist() == [shards[1].path, shards[3].path]
    assert ds.dataset(str(tmp_path), format="ipc", partitioning="hive").count_rows() == 2
    assert "3 corrupt shard(s)" in format_stats(store)


def test_footer_damage_is_caught_by_the_manifest_and_row_count_lies_by_verify(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    episodes = [make_episode(seed=i) for i in range(6)]
    shards = store.write_episodes(episodes)
    _corrupt(tmp_path / shards[0].path, "truncate")
    # A shard whose footer metadata claims two episodes but which holds one (written by a buggy tool).
    liar = tmp_path / shards[1].path
    with pa.OSFile(str(liar)) as f:  # not memory-mapped: the file is rewritten in place below
        table = ipc.open_file(f).read_all()
    with ipc.new_file(str(liar), table.schema) as w:
        w.write_table(table.slice(0, 1))

    manifest = store.manifest()  # reads footers only: catches the truncation, not the lie

    assert [c.path for c in store.quarantined] == [shards[0].path]
    assert manifest.num_rows == 2
    [lie] = store.verify()
    assert lie.path == shards[1].path and "1 rows, metadata says 2 episodes" in lie.reason
    assert [ep.episode_id for ep in store.read_episodes()] == [ep.episode_id for ep in episodes[4:]]


def test_retention_keeps_the_newest_episodes_per_partition(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2, capacity_per_partition=5)
    demos = [make_episode("PullCube-v1", "demo", seed=i) for i in range(9)]
    failures = [make_episode("PullCube-v1", "failure", seed=100 + i) for i in range(3)]
    with store.writer() as writer:
        for ep in demos + failures:
            writer.add(ep)
            time.sleep(0.001)  # distinct created_ns even on coarse clocks

    kept = [ep.episode_id for ep in store.read_episodes(outcome="demo")]
    assert kept == [ep.episode_id for ep in demos[-5:]]  # shards of 2, 2 and the final 1
    assert len(store.read_episodes(outcome="failure")) == 3
    assert store.apply_retention() == []  # idempotent

    store.capacity_per_partition = 1
    removed = store.apply_retention(outcome="demo")
    assert len(removed) == 2 and [ep.episode_id for ep in store.read_episodes(outcome="demo")] == [
        demos[-1].episode_id]
    assert ReplayStore(tmp_path).apply_retention() == []  # no capacity: nothing removed


def test_discard_writer_removes_only_that_writers_shards(tmp_path, make_episode):
    """A unit of work stopped after its shards were stored but before its ledger line is rolled out again: its
    shards go first, whatever partitions they landed in, and no other writer's."""
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    kept = store.write_episodes([make_episode("A", "failure", seed=i) for i in range(3)], "unit-0")
    store.write_episodes([make_episode("A", o, seed=10 + i) for i, o in enumerate(["success", "failure"] * 2)],
                         "unit-1")
    assert len(store.read_episodes()) == 7
    removed = store.discard_writer("unit-1")
    assert len(removed) == 2 and {s.split("/")[-2] for s in removed} == {"outcome=success", "outcome=failure"}
    assert sorted(e.seed for e in store.read_episodes()) == [0, 1, 2]
    assert store.manifest()["writer_id"].to_pylist() == ["unit-0"] * len(kept)
    assert store.discard_writer("unit-1") == []  # idempotent


def test_manifest_rebuild_equals_reconciled_manifest(tmp_path, make_episode, monkeypatch):
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    first = store.write_episodes([make_episode("A", "demo", length=3 + i, seed=i) for i in range(5)])
    assert store.manifest()["episodes"].to_pylist() == [2, 2, 1]
    assert (tmp_path / MANIFEST_NAME).is_file()

    later = store.write_episodes([make_episode("B", "failure", cameras=("base",), seed=9)])
    (tmp_path / first[1].path).unlink()  # retired by someone else
    footers_read = []
    real_footer_row = maintenance._footer_row
    monkeypatch.setattr(maintenance, "_footer_row",
                        lambda files, s: footers_read.append(s.path) or real_footer_row(files, s))

    reconciled = store.manifest(refresh=True)

    assert footers_read == [later[0].path]  # only the new shard was opened
    assert reconciled.equals(ReplayStore(tmp_path).rebuild_manifest())
    assert reconciled.equals(ReplayStore(tmp_path).manifest(refresh=False))  # what was written back
    assert reconciled.column_names[:8] == ["path", "task", "outcome", "episodes", "steps", "bytes", "created",
                                           "writer_id"]
    assert reconciled["path"].to_pylist() == [first[0].path, first[2].path, later[0].path]
    assert reconciled["steps"].to_pylist() == [3 + 4, 7, 12]

    (tmp_path / MANIFEST_NAME).write_bytes(b"garbage")  # a damaged cache is rebuilt, not trusted
    assert store.manifest().equals(reconciled)


def test_stats_and_format_stats(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    assert store.stats() == [] and "no replay shards" in format_stats(store)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=10, seed=i) for i in range(3)]
                         + [make_episode("PullCube-v1", "failure", length=4, seed=9)])
    stats = store.stats()
    assert [(s.task, s.outcome, s.shards, s.episodes, s.steps) for s in stats] == [
        ("PullCube-v1", "demo", 2, 3, 30), ("PullCube-v1", "failure", 1, 1, 4)]
    assert sum(s.bytes for s in stats) == sum(p.stat().st_size for p in tmp_path.rglob("*.arrow")
                                              if not p.name.startswith("_"))
    lines = format_stats(store).splitlines()
    assert lines[0].split() == ["task", "outcome", "shards", "episodes", "steps", "MiB"]
    assert lines[2].split()[:5] == ["PullCube-v1", "demo", "2", "3", "30"]
    assert lines[-1].split()[:4] == ["total", "3", "4", "34"]


def test_readable_with_pyarrow_dataset_pandas_and_duckdb(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    store.write_episodes([make_episode("PullCube-v1", "demo", length=5, seed=i) for i in range(3)])
    store.write_episodes([make_episode("PullCube-v1", "failure", length=6, cameras=("base",), seed=7)])
    store.write_episodes([make_episode("StackCube-v1", "success", length=7, seed=8)])

    # Plain pyarrow, knowing nothing of the store: hive partitions, temporaries and the manifest ignored.
    (tmp_path / "task=PullCube-v1" / "outcome=demo" / ".half-written.arrow.tmp").write_bytes(b"ARROW1")
    plain = ds.dataset(str(tmp_path), format="ipc", partitioning="hive")
    assert plain.count_rows() == 5
    assert plain.to_table(filter=ds.field("outcome") == "demo").num_rows == 3

    dataset = store.dataset()  # schema unified across shards: the image column exists in one shard only
    assert "rgb_base" in dataset.schema.names
    table = dataset.to_table(columns=["task", "outcome", "length", "rgb_base"])
    assert table.num_rows == 5 and table["rgb_base"].null_count == 4
    assert dataset.to_table(filter=ds.field("task") == "StackCube-v1")["length"].to_pylist() == [7]

    df = dataset.to_table(columns=["task", "outcome", "length", "state"]).to_pandas()
    assert df.groupby(["task", "outcome"])["length"].sum().to_dict() == {
        ("PullCube-v1", "demo"): 15, ("PullCube-v1", "failure"): 6, ("StackCube-v1", "success"): 7}
    assert np.array_equal(np.stack(df["state"].iloc[0]), store.read_episodes()[0].state)

    rows = duckdb.sql("select task, outcome, count(*) as episodes, sum(length) as steps "
                      "from dataset group by all order by all").fetchall()
    assert rows == [("PullCube-v1", "demo", 3, 15), ("PullCube-v1", "failure", 1, 6),
                    ("StackCube-v1", "success", 1, 7)]


def test_non_local_filesystem_goes_through_pyarrow_fs(make_episode):
    store = ReplayStore("mock:///replay", episodes_per_shard=2)  # pyarrow's in-memory filesystem
    assert not store.is_local
    episodes = [make_episode("PullCube-v1", "demo", cameras=("base",), seed=i) for i in range(3)]
    store.write_episodes(episodes)
    for got, want in zip(store.read_episodes(), episodes, strict=True):
        assert_same_episode(got, want)
    assert [s.episodes for s in store.stats()] == [3]
    assert store.dataset().count_rows() == 3
    batch = WindowSampler(store, horizon=4).sample(8)  # read into memory: nothing to map
    assert batch["action"].shape == (8, 4, 3) and batch["images"]["base"].shape == (8, 8, 6, 3)
    listing = store.fs.get_file_info(pafs.FileSelector(store.root, recursive=True))
    assert not [i.path for i in listing if "/." in i.path]  # temporaries were moved into place


def test_writer_flushes_on_error_and_refuses_after_close(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=10)
    with pytest.raises(RuntimeError, match="boom"), store.writer() as writer:
        writer.add(make_episode(seed=1))
        raise RuntimeError("boom")
    assert len(store.read_episodes()) == 1  # a finished episode is good data whatever happened next
    with pytest.raises(RuntimeError, match="after close"):
        writer.add(make_episode(seed=2))


def test_writer_commits_in_the_background_and_flush_waits_for_it(tmp_path, make_episode):
    store = ReplayStore(tmp_path, episodes_per_shard=1)
    with store.writer(max_pending=0) as writer:
        [shard] = writer.add(make_episode())
        assert (tmp_path / shard.path).is_file()  # committed before add returned

    writer = store.writer(max_pending=8)
    staged = [writer.add(make_episode(seed=i))[0] for i in range(5)]
    assert writer.flush() == []  # nothing left in the buffers, but it waits for the commits
    assert writer.shards_written == staged and all((tmp_path / s.path).is_file() for s in staged)
    assert not list(tmp_path.rglob(".*.tmp"))
    writer.close()


def test_every_episode_carries_the_run_that_stored_it(tmp_path, make_episode):
    """Two runs into one store stay apart: the writer stamps its run id; shards written before the column
    existed read as no run, and counts per run come from the column (issue 19 item 6)."""
    store = ReplayStore(tmp_path, episodes_per_shard=2)
    store.write_episodes([make_episode("PullCube-v1", "failure", length=4, seed=i) for i in range(3)], run_id="a")
    store.write_episodes([make_episode("PullCube-v1", "success", length=4, seed=9)], run_id="b")
    named = make_episode("PullCube-v1", "failure", length=4, seed=10)
    named.run_id = "c"  # an episode that already says where it came from keeps it
    store.write_episodes([named], run_id="b")
    # a shard from before the column existed: one of run a's shards rewritten without it
    shard = next(s for s in store.list_shards(outcome="failure") if store.read_shard(s.path).num_rows == 2)
    legacy = store.read_shard(shard.path).drop_columns(["run_id"])
    legacy_seeds = set(legacy.column("seed").to_pylist())
    tmp = tmp_path / "legacy.arrow.tmp"
    with ipc.new_file(str(tmp), legacy.schema) as w:
        w.write_table(legacy)
    os.replace(tmp, tmp_path / shard.path)
    store.rebuild_manifest()

    runs = {ep.seed: ep.run_id for ep in store.read_episodes()}
    assert runs == {0: "a", 1: "a", 2: "a", 9: "b", 10: "c"} | {s: "" for s in legacy_seeds}
    assert store.episodes_of_run("a") == {"failure": 1}
    assert store.episodes_of_run("b") == {"success": 1} and store.episodes_of_run("c") == {"failure": 1}
    assert ReplayStore(tmp_path / "empty").episodes_of_run("a") == {}
