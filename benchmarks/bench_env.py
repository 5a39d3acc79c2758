"""Env adapter throughput against bare ManiSkill stepping, and the CPU vectorization choice, in one run.

    .venv/bin/python benchmarks/bench_env.py [--steps 2000] [--rounds 3] [--only rgb]

Bare and adapter steps are interleaved in short blocks (bare, adapter, adapter, bare, ...) so that machine
noise, which on a shared 2-core VM swings single timings by 30%, hits both alike; the ratio is total bare time
over total adapter time. Same task, obs mode, control mode and action sequence. The rgb rows compare the
camera observations the image policy acts on (one 128-pixel camera, the adapter's numpy images and proprioceptive
state) with bare ManiSkill rgb stepping (its torch observation dict).
"""

from __future__ import annotations

import argparse
import statistics
import time

import gymnasium as gym
import numpy as np

from afil_ray.config import EnvConfig
from afil_ray.envs.maniskill import ManiSkillVecEnv, quiet_simulator_logs

TASK = "PushCube-v1"


def interleaved(bare: gym.Env, env: ManiSkillVecEnv, actions: np.ndarray, block: int = 25) -> tuple[float, float]:
    """Steps/s of bare and adapter, measured in alternating blocks of ``block`` steps."""
    bare.reset(seed=0)
    env.reset([0])
    spent = {"bare": 0.0, "adapter": 0.0}
    for i, start in enumerate(range(0, len(actions), block)):
        chunk = actions[start:start + block]
        order = ("bare", "adapter") if i % 2 == 0 else ("adapter", "bare")
        for who in order:
            t = time.perf_counter()
            if who == "bare":
                for a in chunk:
                    bare.step(a[None])
            else:
                for a in chunk:
                    env.step(a[None])
            spent[who] += time.perf_counter() - t
    return len(actions) / spent["bare"], len(actions) / spent["adapter"]


def adapter_steps_per_s(env: ManiSkillVecEnv, actions: np.ndarray) -> float:
    env.reset(list(range(env.num_envs)))
    t = time.perf_counter()
    for a in actions:
        env.step(np.broadcast_to(a, (env.num_envs, a.shape[-1])))
    return len(actions) * env.num_envs / (time.perf_counter() - t)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rgb-steps", type=int, default=60)
    p.add_argument("--rgb-adapter-steps", type=int, default=300)
    p.add_argument("--only", choices=["state", "rgb"], help="run one adapter table only")
    args = p.parse_args()
    quiet_simulator_logs()
    import mani_skill.envs  # noqa: F401

    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (args.steps, 8)).astype(np.float32)
    if args.only != "state":
        rgb_adapter_table(actions[:args.rgb_adapter_steps], args.rounds)
    if args.only == "rgb":
        return
    limit = args.steps + 10  # no episode ends inside a timed run, in either setting
    vec_steps = 600

    print(f"## Env adapter vs bare gym.make ({TASK}, state obs, pd_joint_delta_pos, 1 env, {args.steps} steps)\n")
    bare = gym.make(TASK, num_envs=1, sim_backend="physx_cpu", obs_mode="state",
                    control_mode="pd_joint_delta_pos", max_episode_steps=10**9)
    variants = {
        "adapter, snapshots every 10 steps": EnvConfig(task=TASK, num_envs=1, backend="cpu",
                                                       cpu_vectorization="loop", max_episode_steps=limit),
        "adapter, no snapshots": EnvConfig(task=TASK, num_envs=1, backend="cpu", cpu_vectorization="loop",
                                           max_episode_steps=limit, snapshot_every=0),
    }
    rows = []
    for name, cfg in variants.items():
        results = []
        for _ in range(args.rounds):  # a fresh adapter env each round: instances differ by a few percent
            with ManiSkillVecEnv(cfg) as env:
                results.append(interleaved(bare, env, actions))
        ratios = sorted(a / b for b, a in results)
        rows.append((name, statistics.median(b for b, _ in results), statistics.median(a for _, a in results),
                     ratios))
    bare.close()
    print(f"| setting | bare steps/s | adapter steps/s | adapter / bare (median of {args.rounds} rounds) | range |")
    print("|---|---|---|---|---|")
    for name, b, a, ratios in rows:
        print(f"| {name} | {b:.0f} | {a:.0f} | {statistics.median(ratios):.2f} | {ratios[0]:.2f}-{ratios[-1]:.2f} |")

    print("\n## CPU vectorization: plain loop in process vs gymnasium AsyncVectorEnv (processes)\n")
    print("| obs | envs | loop env-steps/s | async env-steps/s | async / loop |")
    print("|---|---|---|---|---|")
    for obs_mode, n, steps in (("state", 2, vec_steps // 2), ("state", 4, vec_steps // 4),
                               ("rgb", 2, args.rgb_steps)):
        rates = {}
        for mode in ("loop", "async"):
            cfg = EnvConfig(task=TASK, obs_mode=obs_mode, num_envs=n, backend="cpu", cpu_vectorization=mode,
                            max_episode_steps=steps + 10)
            with ManiSkillVecEnv(cfg) as env:
                adapter_steps_per_s(env, actions[:5])  # warm-up (first renders compile shaders)
                rates[mode] = statistics.median(adapter_steps_per_s(env, actions[:steps]) for _ in range(2))
        print(f"| {obs_mode} | {n} | {rates['loop']:.0f} | {rates['async']:.0f} | "
              f"{rates['async'] / rates['loop']:.2f} |")


def rgb_adapter_table(actions: np.ndarray, rounds: int, size: int = 128) -> None:
    steps = len(actions)
    print(f"## rgb env adapter vs bare gym.make ({TASK}, one {size}-pixel camera, 1 env, {steps} steps)\n")
    bare = gym.make(TASK, num_envs=1, sim_backend="physx_cpu", obs_mode="rgb", control_mode="pd_joint_delta_pos",
                    max_episode_steps=10**9, sensor_configs=dict(width=size, height=size))
    cfg = EnvConfig(task=TASK, obs_mode="rgb", camera_size=size, num_envs=1, backend="cpu",
                    cpu_vectorization="loop", max_episode_steps=steps + 10, snapshot_every=0)
    results = []
    for _ in range(rounds):
        with ManiSkillVecEnv(cfg) as env:
            interleaved(bare, env, actions[:10], block=5)  # warm-up: the first renders compile shaders
            results.append(interleaved(bare, env, actions, block=10))
    bare.close()
    ratios = sorted(a / b for b, a in results)
    print(f"| setting | bare steps/s | adapter steps/s | adapter / bare (median of {rounds} rounds) | range |")
    print("|---|---|---|---|---|")
    print(f"| rgb adapter, no snapshots | {statistics.median(b for b, _ in results):.1f} | "
          f"{statistics.median(a for _, a in results):.1f} | {statistics.median(ratios):.2f} | "
          f"{ratios[0]:.2f}-{ratios[-1]:.2f} |\n")


if __name__ == "__main__":
    main()
