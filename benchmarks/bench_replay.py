"""Replay store benchmark: shard writes against a bare pyarrow IPC write, and window sampling latency.

Run: ``.venv/bin/python benchmarks/bench_replay.py`` (about a minute; prints a markdown table). Episodes are
shaped like ManiSkill state-mode rollouts: 120 steps, state 40, action 8, a simulator snapshot every 10 steps
(12 x 20 KB). Results are recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc

from afil_ray.replay import Episode, ReplayStore, WindowSampler, episodes_to_table


def make_episodes(count: int, *, length: int, state_dim: int, action_dim: int, snapshots: int,
                  snapshot_bytes: int, seed: int = 0) -> list[Episode]:
    rng = np.random.default_rng(seed)
    episodes = []
    for i in range(count):
        flags = np.zeros(length, bool)
        episodes.append(Episode(
            task="PullCube-v1", outcome=("demo", "failure")[i % 2],
            state=rng.standard_normal((length, state_dim), dtype=np.float32),
            action=rng.standard_normal((length, action_dim), dtype=np.float32),
            reward=rng.standard_normal(length, dtype=np.float32), step_success=flags, terminated=flags,
            truncated=flags, final_state=rng.standard_normal(state_dim, dtype=np.float32),
            instruction="pull the cube", seed=i, source="bench", control_mode="pd_joint_delta_pos",
            snapshot_steps=list(range(0, length, length // snapshots))[:snapshots],
            snapshots=[rng.bytes(snapshot_bytes) for _ in range(snapshots)],
        ))
    return episodes


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*.arrow") if not p.name.startswith("_"))


def write_store(episodes: list[Episode], root: Path, per_shard: int, compression: str) -> tuple[float, int]:
    start = time.perf_counter()
    ReplayStore(root, episodes_per_shard=per_shard, compression=compression).write_episodes(episodes)
    return time.perf_counter() - start, dir_bytes(root)


def write_bare(episodes: list[Episode], root: Path, per_shard: int) -> tuple[float, int]:
    """What the store does minus partitioning, checksums, fsync and rename: convert, then pa.ipc.new_file."""
    root.mkdir(parents=True)
    start = time.perf_counter()
    by_outcome: dict[str, list[Episode]] = {}
    for ep in episodes:
        by_outcome.setdefault(ep.outcome, []).append(ep)
    n = 0
    for group in by_outcome.values():
        for i in range(0, len(group), per_shard):
            table = episodes_to_table(group[i: i + per_shard])
            with ipc.new_file(str(root / f"{n}.arrow"), table.schema) as w:
                w.write_table(table)
            n += 1
    return time.perf_counter() - start, dir_bytes(root)


def write_bare_prebuilt(tables: list[pa.Table], root: Path) -> tuple[float, int]:
    root.mkdir(parents=True)
    start = time.perf_counter()
    for n, table in enumerate(tables):
        with ipc.new_file(str(root / f"{n}.arrow"), table.schema) as w:
            w.write_table(table)
    return time.perf_counter() - start, dir_bytes(root)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write-episodes", type=int, default=512)
    parser.add_argument("--sample-episodes", type=int, default=2000)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--horizon", type=int, default=16)
    parser.add_argument("--sample-repeats", type=int, default=200)
    parser.add_argument("--dir", default=None, help="scratch directory (default: a temporary one)")
    args = parser.parse_args()
    shape = dict(length=120, state_dim=40, action_dim=8, snapshots=12, snapshot_bytes=20_000)

    with tempfile.TemporaryDirectory(dir=args.dir, prefix="bench_replay_") as scratch_dir:
        scratch = Path(scratch_dir)
        episodes = make_episodes(args.write_episodes, **shape)
        by_outcome: dict[str, list[Episode]] = {}
        for ep in episodes:
            by_outcome.setdefault(ep.outcome, []).append(ep)
        tables = [episodes_to_table(g[i: i + args.per_shard]) for g in by_outcome.values()
                  for i in range(0, len(g), args.per_shard)]

        variants = {
            "store writer, none (fsync + rename)": lambda d: write_store(episodes, d, args.per_shard, "none"),
            "store writer, lz4": lambda d: write_store(episodes, d, args.per_shard, "lz4"),
            "store writer, zstd": lambda d: write_store(episodes, d, args.per_shard, "zstd"),
            "bare: episodes_to_table + ipc.new_file": lambda d: write_bare(episodes, d, args.per_shard),
            "bare: ipc.new_file of prebuilt tables": lambda d: write_bare_prebuilt(tables, d),
        }
        times: dict[str, list[float]] = {k: [] for k in variants}
        sizes: dict[str, int] = {}
        for r in range(args.repeats):  # interleaved, so slow and fast moments of the disk are shared
            for name, run in variants.items():
                os.sync()  # start clean: no run pays for writing back the dirty pages of the one before
                seconds, size = run(scratch / f"w{r}-{len(times[name])}-{abs(hash(name))}")
                times[name].append(seconds)
                sizes[name] = size

        rows = []
        bare = times["bare: episodes_to_table + ipc.new_file"]
        for name in variants:
            t, n = times[name], args.write_episodes
            # Paired per run: this disk's speed drifts over seconds, which a ratio of medians would pick up.
            ratio = statistics.median(b / v for b, v in zip(bare, t, strict=True))
            rows.append((name, f"{n / statistics.median(t):,.0f}", f"{n / max(t):,.0f}-{n / min(t):,.0f}",
                         f"{sizes[name] / statistics.median(t) / 1e6:,.0f}", f"{sizes[name] / 1e6:,.0f}",
                         f"{ratio:.2f}"))

        # Sampling: a store of sample_episodes episodes, uncompressed (memory-mapped, zero-copy).
        sample_root = scratch / "sample_store"
        store = ReplayStore(sample_root, episodes_per_shard=args.per_shard)
        for start in range(0, args.sample_episodes, 500):  # generated in slices to bound memory
            n = min(500, args.sample_episodes - start)
            store.write_episodes(make_episodes(n, **shape, seed=1000 + start))
        build_start = time.perf_counter()
        sampler = WindowSampler(store, horizon=args.horizon, seed=0)
        build = time.perf_counter() - build_start
        balanced = WindowSampler(store, horizon=args.horizon, balance="partitions", seed=0)
        latencies = {}
        for name, s in (("uniform", sampler), ("balanced", balanced)):
            s.sample(args.batch)  # warm-up
            lat = []
            for _ in range(args.sample_repeats):
                t0 = time.perf_counter()
                s.sample(args.batch)
                lat.append(time.perf_counter() - t0)
            latencies[name] = (statistics.median(lat) * 1e3, float(np.percentile(lat, 95)) * 1e3)
        store_mb = dir_bytes(sample_root) / 1e6
        shards = len(store.list_shards())

    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"pyarrow {pa.__version__}, numpy {np.__version__}")
    print(f"Episodes: 120 steps, state 40, action 8, 12 x 20 KB snapshots; {args.per_shard} per shard; "
          f"median of {args.repeats} runs of {args.write_episodes} episodes\n")
    print("| write path | episodes/s | range over runs | MB/s | MB written | vs bare (paired) |")
    print("|---|---:|---:|---:|---:|---:|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"\nSampling {args.batch} windows (H={args.horizon}) from {args.sample_episodes} episodes "
          f"({shards} shards, {store_mb:,.0f} MB, warm page cache), {args.sample_repeats} repeats; "
          f"sampler build {build * 1e3:.0f} ms\n")
    print("| sampling | median ms | p95 ms |")
    print("|---|---:|---:|")
    for name, (median, p95) in latencies.items():
        print(f"| {name} | {median:.2f} | {p95:.2f} |")


if __name__ == "__main__":
    main()
