"""Camera episodes in the replay store: MiB per episode and read throughput per compression (none, lz4, zstd).

Run: ``.venv/bin/python benchmarks/bench_image_store.py runs/vla_cpu/replay`` on a store of rgb episodes (e.g.
``afil-ray demos --config configs/vla_cpu.yaml``); prints markdown. Each compression gets a copy of every episode
in a temporary store; "load" maps (none) or reads and decompresses (lz4, zstd) every shard into a WindowSampler,
"sample" draws 50 batches of 128 windows with their images from it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from afil_ray.replay import ReplayStore, WindowSampler


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("store", help="a replay store holding camera episodes")
    p.add_argument("--batches", type=int, default=50)
    args = p.parse_args()
    episodes = ReplayStore(args.store).read_episodes()
    cameras = sorted(episodes[0].images)
    steps = sum(e.length for e in episodes)
    shape = episodes[0].images[cameras[0]].shape[1:]
    print(f"{len(episodes)} episodes, {steps} steps, cameras {cameras} {shape}\n")
    print("| compression | MiB per episode | write (s) | load (s) | windows/s (batches of 128, images) |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for compression in ("none", "lz4", "zstd"):
            root = Path(tmp) / compression
            store = ReplayStore(root, compression=compression, episodes_per_shard=32)
            t0 = time.perf_counter()
            store.write_episodes(episodes)
            write = time.perf_counter() - t0
            size = sum(f.stat().st_size for f in root.rglob("*.arrow"))
            t0 = time.perf_counter()
            sampler = WindowSampler(store, 16, cameras=cameras, seed=0)
            load = time.perf_counter() - t0
            t0 = time.perf_counter()
            for _ in range(args.batches):
                sampler.sample(128)
            rate = args.batches * 128 / (time.perf_counter() - t0)
            print(f"| {compression} | {size / 2**20 / len(episodes):.2f} | {write:.1f} | {load:.2f} | {rate:,.0f} |")


if __name__ == "__main__":
    main()
