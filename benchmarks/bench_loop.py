"""The harvest-learn loop on a local Ray: env throughput against one process, weight sync latency and size.

Run: ``.venv/bin/python benchmarks/bench_loop.py --config configs/quickstart.yaml`` (about 10 minutes on 2
cores; the start checkpoint is ``loop.init_from``, so run ``make run`` or ``afil-ray train`` first). Prints
markdown.

1. Env steps/s of the full loop (1 rollout actor, the learner training beside it, no evaluator) against the same
   policy and env stepping in this process with nothing else running, measured as in-process / loop /
   in-process blocks in one run; the ratio uses the mean of the two in-process blocks.
2. For 1, 2 and 4 rollout actors: publish-to-applied latency (from the learner's ``ray.put`` to an actor
   loading the weights; medians over every application), bytes serialized per version (one ``ray.put`` per
   version, so it must not grow with the number of actors) and the staleness distribution (versions behind the
   newest at the end of each rollout round).
"""

from __future__ import annotations

import argparse
import copy
import itertools
import time

import numpy as np
import torch

from afil_ray.config import Config, load_config
from afil_ray.driver import LoopDriver
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import episode_instruction
from afil_ray.policy.loading import load_start_policy
from afil_ray.rollout import ChunkedRollout


def in_process_steps_per_s(cfg: Config, seconds: float) -> float:
    torch.set_num_threads(cfg.loop.torch_threads)
    policy = load_start_policy(cfg.loop.init_from)
    with make_vec_env(cfg.env) as env:  # every task of a task list, as the loop's rollout actors run them
        rollout = ChunkedRollout(env, policy, cfg.sampler, itertools.count(2_000_000),
                                 generator=torch.Generator().manual_seed(0),
                                 instruct=episode_instruction(cfg.env.paraphrase))
        for _ in range(20):  # warm-up
            rollout.step()
        t0, steps = time.perf_counter(), 0
        while time.perf_counter() - t0 < seconds:
            rollout.step()
            steps += env.num_envs
        return steps / (time.perf_counter() - t0)


def loop_run(cfg: Config, actors: int, seconds: float, run_dir: str) -> dict:
    cfg = copy.deepcopy(cfg)
    cfg.run_dir = run_dir
    cfg.loop.num_rollout_actors, cfg.loop.duration_s, cfg.loop.eval_every_s = actors, seconds, 0
    driver = LoopDriver(cfg)
    driver.start()  # actors constructed before the clock starts
    t0 = time.perf_counter()
    summary = driver.run()
    summary["measured_s"] = time.perf_counter() - t0
    summary["staleness_raw"] = list(driver.metrics.staleness)
    summary["latency_raw"] = list(driver.metrics.latency)
    summary["bytes_raw"] = list(driver.metrics.push_bytes)
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/quickstart.yaml")
    p.add_argument("--seconds", type=float, default=60.0, help="per measured block")
    p.add_argument("--actors", default="1,2,4")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    cfg = load_config(args.config, args.overrides)
    cfg.loop.local_num_cpus = 8  # placement only: the actors share this machine's cores either way
    base = f"runs/bench_loop/{time.strftime('%Y%m%d-%H%M%S')}"

    first = in_process_steps_per_s(cfg, args.seconds / 2)
    one = loop_run(cfg, 1, args.seconds, f"{base}/actors1")
    second = in_process_steps_per_s(cfg, args.seconds / 2)
    loop_rate = one["env_steps_per_s"]  # first to last rollout round: start-up and shutdown excluded
    print(f"## Loop throughput ({args.config}, env.num_envs={cfg.env.num_envs}, {cfg.loop.torch_threads} torch "
          "thread(s) per actor)\n")
    print("| in-process (before) | loop, 1 actor + learner | in-process (after) | loop / in-process |")
    print("|---|---|---|---|")
    print(f"| {first:.1f} steps/s | {loop_rate:.1f} steps/s (learner at step {one['learner_step']}) | "
          f"{second:.1f} steps/s | **{loop_rate / np.mean([first, second]):.2f}** |\n")

    runs = {1: one}
    for n in [int(a) for a in args.actors.split(",") if int(a) != 1]:
        runs[n] = loop_run(cfg, n, args.seconds, f"{base}/actors{n}")
    print("## Weight sync\n")
    print("| rollout actors | versions | publish-to-applied median (p90) | bytes per version | staleness "
          "(versions behind: share of rounds) |")
    print("|---|---|---|---|---|")
    for n, r in sorted(runs.items()):
        lat = np.asarray(r["latency_raw"]) * 1000
        stale = np.asarray(r["staleness_raw"])
        hist = ", ".join(f"{v}: {np.mean(stale == v):.0%}" for v in np.unique(stale)) if len(stale) else "-"
        sizes = sorted(set(r["bytes_raw"]))
        print(f"| {n} | {r['versions_published']} | {np.median(lat):.0f} ms ({np.percentile(lat, 90):.0f} ms) | "
              f"{'/'.join(f'{s:,}' for s in sizes)} | {hist} |" if len(lat) else f"| {n} | 0 | - | - | {hist} |")


if __name__ == "__main__":
    main()
