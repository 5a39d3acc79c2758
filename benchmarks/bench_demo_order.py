"""Demo generation with workers' results written in submission order (the default) vs completion order.

Run: ``.venv/bin/python benchmarks/bench_demo_order.py`` (about 5 minutes; prints a markdown table). Ordered
writes make the store, and so a seeded training run, the same on every run; the cost is that up to
``2 x workers`` finished demos can wait for a slower earlier seed, leaving a worker idle. LiftPegUpright has the
most uneven planner times of the primitive tasks (146-335 steps), so it is the worst case. The two settings
alternate, each into a fresh store, so machine load hits both alike. Results are recorded in
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time

import afil_ray.demos.generate as generate
from afil_ray.config import load_config
from afil_ray.process_pool import spawn_map
from afil_ray.replay import ReplayStore


def run_once(task: str, num: int, workers: int, ordered: bool) -> tuple[float, list[int]]:
    """Wall seconds and the stored demo seeds, in store order, of one generation into a fresh store."""
    generate.spawn_map = functools.partial(spawn_map, ordered=ordered)
    try:
        with tempfile.TemporaryDirectory() as root:
            cfg = load_config(None, [f"env.task={task}", f"demos.num={num}", f"demos.workers={workers}",
                                     f"replay.root={root}", "demos.flush_every=8"])
            store = ReplayStore(root)
            t0 = time.perf_counter()
            generate.generate_demos(cfg, store, progress=False)
            seconds = time.perf_counter() - t0
            seeds = [ep.seed for ep in store.read_episodes(task=task, outcome="demo")]
    finally:
        generate.spawn_map = spawn_map
    return seconds, seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="LiftPegUpright-v1")
    parser.add_argument("--num", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    times: dict[bool, list[float]] = {True: [], False: []}
    in_seed_order: dict[bool, list[bool]] = {True: [], False: []}
    for _ in range(args.repeats):
        for ordered in (True, False):
            seconds, seeds = run_once(args.task, args.num, args.workers, ordered)
            times[ordered].append(seconds)
            in_seed_order[ordered].append(seeds == sorted(seeds))
            print(f"  ordered={ordered}: {seconds:.1f} s, store in seed order: {seeds == sorted(seeds)}")
    print(f"\n{args.task}, {args.num} demos, {args.workers} workers, {args.repeats} alternating repeats:\n")
    print("| writes | wall per run (s) | median (s) | store in seed order |")
    print("|---|---|---|---|")
    for ordered in (True, False):
        label = "submission order (default)" if ordered else "completion order"
        print(f"| {label} | {', '.join(f'{t:.1f}' for t in times[ordered])} | "
              f"{statistics.median(times[ordered]):.1f} | {sum(in_seed_order[ordered])}/{args.repeats} |")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    print(f"\nratio ordered / completion order: {ratio:.2f}")


if __name__ == "__main__":
    main()
