"""How often LIBERO's scripted demonstrator solves each task, judged by the benchmark's own check (issue 21).

Runs ``PickPlaceScript`` closed loop in the adapter (state mode, no cameras: the script reads the simulator, not
the observations) from each seed and prints one line per episode and a per-task yield with the median length.
Seeds below 100000 are new placements (where demos come from), 100000-100049 the shipped initial states.

    .venv/bin/python scripts/libero_script_yields.py --suite libero_object --seeds 0-9
    .venv/bin/python scripts/libero_script_yields.py --suite libero_spatial --seeds 0-4,100000-100004
"""

from __future__ import annotations

import argparse
import statistics
import time

from afil_ray.config import EnvConfig
from afil_ray.demos.libero_script import PickPlaceScript
from afil_ray.envs.factory import make_vec_env


def parse_seeds(text: str) -> list[int]:
    """``0-4,100000-100004`` -> the ten seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        seeds += list(range(int(first), int(last or first) + 1))
    return seeds


def run_task(task: str, seeds: list[int]) -> list[tuple[int, bool, int]]:
    """(seed, success, steps) of the script from each seed."""
    env = make_vec_env(EnvConfig(task=task, control_mode="osc_pose", cpu_vectorization="loop", num_envs=1,
                                 snapshot_every=0))
    results = []
    try:
        for seed in seeds:
            start = time.perf_counter()
            env.reset([seed])
            script = PickPlaceScript(env.local_env(0).libero_env.env)
            while True:
                res = env.step(script.act()[None])
                if res.done[0]:
                    break
            ok, step = bool(res.success[0]), int(res.elapsed_steps[0])
            results.append((seed, ok, step))
            why = "" if ok else f" ({script.gave_up or 'episode limit'})"
            print(f"{task} seed {seed}: {'success' if ok else 'failure'} in {step} steps, "
                  f"{time.perf_counter() - start:.1f} s{why}", flush=True)
    finally:
        env.close()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", required=True, help="libero_object, libero_spatial, ...")
    parser.add_argument("--tasks", default="0-9", help="task indices, e.g. 0-9 or 4,7")
    parser.add_argument("--seeds", default="0-4", help="episode seeds, e.g. 0-4,100000-100004")
    args = parser.parse_args()
    seeds = parse_seeds(args.seeds)
    summary = []
    for index in parse_seeds(args.tasks):
        task = f"{args.suite}/{index}"
        results = run_task(task, seeds)
        lengths = [n for _, ok, n in results if ok]
        summary.append(f"{task}: {len(lengths)}/{len(results)} solved, median length "
                       f"{statistics.median(lengths) if lengths else '-'}")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
