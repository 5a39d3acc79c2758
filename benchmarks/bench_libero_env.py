"""The LIBERO adapter against bare ``libero`` stepping, with and without cameras, in one run (issue 21).

    .venv/bin/python benchmarks/bench_libero_env.py [--task libero_object/0] [--rounds 3]

Bare and adapter steps alternate in short blocks (bare, adapter, adapter, bare, ...) so that the noise of a shared
2-core machine hits both alike; each row is the median over rounds of total bare time / total adapter time for the
same random actions. Bare is LIBERO's own env as the adapter builds it (``ControlEnv`` without a renderer;
``OffScreenRenderEnv`` with agentview and the wrist camera at 128 pixels); the adapter adds its numpy observation
batch, its step counting and snapshots every 10 steps, and re-reads observations from the simulator state.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import numpy as np

from afil_ray.config import EnvConfig
from afil_ray.envs.libero import CAMERAS, LiberoVecEnv, _libero, bddl_path, parse_task

SIZE = 128


def bare_env(task: str, cameras: bool) -> Any:
    """LIBERO's env for ``task`` built the way the adapter builds it."""
    _libero()
    from libero.libero.envs import OffScreenRenderEnv
    from libero.libero.envs.env_wrapper import ControlEnv

    suite, index = parse_task(task)
    kwargs: dict[str, Any] = dict(bddl_file_name=bddl_path(suite, index), camera_heights=SIZE, camera_widths=SIZE,
                                  hard_reset=False, ignore_done=True)
    if cameras:
        return OffScreenRenderEnv(camera_names=list(CAMERAS.values()), **kwargs)
    return ControlEnv(use_camera_obs=False, has_offscreen_renderer=False, **kwargs)


def interleaved(bare: Any, env: LiberoVecEnv, actions: np.ndarray, block: int) -> tuple[float, float]:
    """Seconds spent by bare and adapter on the same actions, in alternating blocks."""
    bare.seed(0)
    bare.reset()
    env.reset([0])
    spent = {"bare": 0.0, "adapter": 0.0}
    for i, start in enumerate(range(0, len(actions), block)):
        chunk = actions[start:start + block]
        for who in (("bare", "adapter") if i % 2 == 0 else ("adapter", "bare")):
            t = time.perf_counter()
            if who == "bare":
                for a in chunk:
                    bare.step(a)
            else:
                for a in chunk:
                    env.step(a[None])
            spent[who] += time.perf_counter() - t
    return spent["bare"], spent["adapter"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="libero_object/0")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=400, help="steps per round without cameras (with: a quarter)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"| setting | bare steps/s | adapter steps/s | adapter / bare (median of {args.rounds} rounds) | range |")
    print("|---|---|---|---|---|")
    for cameras in (False, True):
        steps = args.steps // 4 if cameras else args.steps
        bare = bare_env(args.task, cameras)
        env = LiberoVecEnv(EnvConfig(task=args.task, obs_mode="rgb" if cameras else "state", camera_size=SIZE,
                                     cameras=list(CAMERAS) if cameras else [], control_mode="osc_pose", num_envs=1,
                                     cpu_vectorization="loop", max_episode_steps=10**6))
        try:
            rows = []
            for _ in range(args.rounds):
                actions = rng.uniform(-1, 1, (steps, 7)).astype(np.float32)
                rows.append(interleaved(bare, env, actions, block=max(5, steps // 20)))
        finally:
            env.close()
            bare.close()
        ratios = [b / a for b, a in rows]
        bare_rate = statistics.median(steps / b for b, _ in rows)
        env_rate = statistics.median(steps / a for _, a in rows)
        what = f"{args.task}, {'two 128-px cameras' if cameras else 'no cameras'}, 1 env, {steps} steps per round"
        print(f"| {what} | {bare_rate:.1f} | {env_rate:.1f} | **{statistics.median(ratios):.2f}** | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |", flush=True)


if __name__ == "__main__":
    main()
