"""Per-chunk sampling latency of the image-and-language policy (configs/vla_cpu.yaml's policy: frozen
EfficientNet-Lite0 on one 128-pixel camera, frozen MiniLM), success only vs adaptive guidance, at batch 1 and 64.

Run: ``.venv/bin/python benchmarks/bench_image_sampling.py`` (about a minute on 2 cores; prints markdown). One
``policy.sample`` call per chunk: the camera encoded, the instruction (remembered after its first call), the
prefix once, then K = 10 head steps. Interleaved rounds (order rotating); medians, and medians of per-round
ratios. The state-only policy with the same heads is timed alongside, for what the camera costs.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch

from afil_ray.config import SamplerConfig, load_config
from afil_ray.policy import DAGPolicy

STATE_DIM, ACTION_DIM, CAMERA = 28, 8, 128
INSTRUCTION = "pull the cube to the goal region"
SAMPLERS = {"success_only": SamplerConfig(kind="success_only"), "adaptive": SamplerConfig(kind="adaptive", lam=1.0)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=5, help="sample calls per variant per round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_config("configs/vla_cpu.yaml").policy
    torch.manual_seed(0)
    policies = {"image + language": DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, ["base_camera"]).eval(),
                "state only": DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, []).eval()}
    rng = np.random.default_rng(0)
    variants = []
    for batch in (1, 64):
        obs = {"state": rng.standard_normal((batch, STATE_DIM)).astype(np.float32),
               "rgb_base_camera": rng.integers(0, 256, (batch, CAMERA, CAMERA, 3), dtype=np.uint8)}
        for policy_name, policy in policies.items():
            for sampler_name, sampler in SAMPLERS.items():
                variants.append((batch, policy_name, sampler_name, policy, sampler, obs))
    times: dict[tuple[int, str, str], list[float]] = {v[:3]: [] for v in variants}
    for v in variants:  # warm-up (the instruction is encoded once here)
        v[3].sample(v[5], INSTRUCTION, v[4], generator=torch.Generator().manual_seed(0))
    for r in range(args.rounds):
        for batch, policy_name, sampler_name, policy, sampler, obs in variants[r % len(variants):] + \
                variants[: r % len(variants)]:
            t0 = time.perf_counter()
            for _ in range(args.calls):
                policy.sample(obs, INSTRUCTION, sampler, generator=torch.Generator().manual_seed(0))
            times[(batch, policy_name, sampler_name)].append((time.perf_counter() - t0) / args.calls * 1e3)
    print(f"{args.threads} threads, {args.rounds} rounds x {args.calls} calls; ms per chunk (median)\n")
    print("| batch | policy | success_only (ms) | adaptive (ms) | adaptive / success_only |")
    print("|---|---|---|---|---|")
    for batch in (1, 64):
        for policy_name in policies:
            a, b = times[(batch, policy_name, "success_only")], times[(batch, policy_name, "adaptive")]
            ratio = statistics.median(y / x for x, y in zip(a, b, strict=True))
            print(f"| {batch} | {policy_name} | {statistics.median(a):.1f} | {statistics.median(b):.1f} | "
                  f"{ratio:.2f} |")


if __name__ == "__main__":
    main()
