"""Evaluation rollouts that render every frame against ones that render only the frames the policy samples from.

Run: ``.venv/bin/python benchmarks/bench_eval_render.py [--seconds 20] [--rounds 3]`` (about 5 minutes on 2 cores;
prints markdown). For each simulator (ManiSkill PushCube with configs/vla_cpu.yaml's camera, LIBERO-Object task 0
with configs/libero_object_cpu.yaml's two cameras) two envs of the same task run the same untrained
image-and-language policy of that config (frozen pretrained encoders, the full sampling cost) through
``ChunkedRollout``: one keeping every frame (what a harvest stores), one with ``keep_images=False`` (what an
evaluation report runs: the env renders 1 in ``execute_steps`` observations). The two are stepped in alternating
blocks of ``--seconds`` so machine noise hits both alike; env steps/s and the ratio of the totals.
"""

from __future__ import annotations

import argparse
import itertools
import time

import torch

from afil_ray.config import load_config
from afil_ray.envs.factory import make_vec_env
from afil_ray.envs.tasks import episode_instruction
from afil_ray.policy import DAGPolicy
from afil_ray.rollout import ChunkedRollout

CASES = {"ManiSkill PushCube-v1, 1 camera": ("configs/vla_cpu.yaml", "PushCube-v1"),
         "LIBERO libero_object/0, 2 cameras": ("configs/libero_object_cpu.yaml", "libero_object/0")}


def measure(name: str, config: str, task: str, seconds: float, rounds: int) -> str:
    cfg = load_config(config)
    cfg.env = cfg.env.for_task(task)
    cfg.env.num_envs, cfg.env.cpu_vectorization = 1, "loop"
    envs = {keep: make_vec_env(cfg.env) for keep in (True, False)}
    torch.manual_seed(0)
    env = envs[True]
    policy = DAGPolicy.from_config(cfg.policy, env.state_dim, env.action_dim, list(env.cameras)).eval()
    rollouts = {keep: ChunkedRollout(env, policy, cfg.sampler, itertools.count(1_000_000), keep_images=keep,
                                     generator=torch.Generator().manual_seed(0),
                                     instruct=episode_instruction(cfg.env.paraphrase))
                for keep, env in envs.items()}
    spent, steps = {True: 0.0, False: 0.0}, {True: 0, False: 0}
    for i in range(2 * rounds):
        keep = (i % 2 == 0) == (i // 2 % 2 == 0)  # every frame, outcome-only, outcome-only, every frame, ...
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            rollouts[keep].step()
            steps[keep] += 1
        spent[keep] += time.perf_counter() - t0
    for env in envs.values():
        env.close()
    full, lazy = steps[True] / spent[True], steps[False] / spent[False]
    return f"| {name} | {full:.1f} | {lazy:.1f} | {lazy / full:.2f} |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=20.0, help="length of one block")
    p.add_argument("--rounds", type=int, default=3, help="block pairs per simulator")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rows = [measure(name, config, task, args.seconds, args.rounds) for name, (config, task) in CASES.items()]
    print(f"{args.threads} torch thread(s), {args.rounds} x 2 blocks of {args.seconds:.0f} s per variant\n")
    print("| env | every frame (env steps/s) | frames the policy samples from (env steps/s) | speed-up |")
    print("|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
