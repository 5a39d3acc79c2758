"""Per-chunk sampling latency of the DAG-VLA policy: success-only vs static and adaptive failure-informed guidance.

Run: ``.venv/bin/python benchmarks/bench_sampling.py`` (about two minutes on 2 cores; prints markdown). The
default tiny policy with ManiSkill-like state observations (state 40, action 8, H = 16, K = 10 steps): one
``policy.sample`` call per chunk, i.e. prefix encoding once plus K head evaluations. Samplers are timed in
interleaved rounds (every sampler once per round, the order rotating); latencies are medians over rounds and
ratios medians of the per-round ratios, so drift on a shared machine cancels. ``adaptive`` is the guided sampler
as it runs by default (heads stacked into one call where that pays: ``afil_ray.policy.sampler.fusing_pays``),
``stacked`` forces the one stacked call at every batch, ``two calls`` is ``sampler.fused_heads=false`` (the failure
head as a second call per step); the crossover of the last two is where the default switches.

The guided/success-only ratio is bounded below by the work: guidance evaluates two heads per step, so with
equal heads it costs about (prefix + 2 K head) / (prefix + K head); a fused call saves call overhead, not FLOPs.
The second table shows settings in which that ratio is small: a lighter failure head, or a backbone heavy
enough that the prefix dominates (as in pi0, whose 2B-parameter VLM dwarfs its 300M action expert).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import time
from collections.abc import Iterator

import numpy as np
import torch

from afil_ray.config import PolicyConfig, SamplerConfig
from afil_ray.policy import DAGPolicy
from afil_ray.policy import sampler as sampling

STATE_DIM, ACTION_DIM = 40, 8
INSTRUCTION = "pull the cube to the goal region"
SAMPLERS = {
    "success_only": SamplerConfig(kind="success_only"),
    "static": SamplerConfig(kind="static", w=0.05),
    "adaptive": SamplerConfig(kind="adaptive", lam=1.0),
    "adaptive, stacked": SamplerConfig(kind="adaptive", lam=1.0),
    "adaptive, two calls": SamplerConfig(kind="adaptive", lam=1.0, fused_heads=False),
}
FORCED_STACK = {"adaptive, stacked"}  # timed with the stacked call at any batch size


@contextlib.contextmanager
def stacking_forced(on: bool) -> Iterator[None]:
    """Lift the CPU batch limit of the stacked call, so one arm measures it at every batch."""
    limit = sampling.FUSE_CPU_MAX_BATCH
    sampling.FUSE_CPU_MAX_BATCH = 10**9 if on else limit
    try:
        yield
    finally:
        sampling.FUSE_CPU_MAX_BATCH = limit


def observation(batch: int, cameras: tuple[str, ...], image: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = {"state": rng.standard_normal((batch, STATE_DIM)).astype(np.float32)}
    for cam in cameras:
        obs[f"rgb_{cam}"] = rng.integers(0, 256, (batch, image, image, 3), dtype=np.uint8)
    return obs


def time_samplers(policy: DAGPolicy, obs: dict, samplers: dict[str, SamplerConfig], rounds: int,
                  calls: int) -> dict[str, list[float]]:
    """Mean per-chunk latency (ms) of each sampler in each round; samplers interleaved, order rotating."""
    names = list(samplers)
    times: dict[str, list[float]] = {n: [] for n in names}
    g = torch.Generator().manual_seed(0)
    for name in names:  # warm-up (allocations, the fused weight stack)
        with stacking_forced(name in FORCED_STACK):
            policy.sample(obs, INSTRUCTION, samplers[name], g)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            with stacking_forced(name in FORCED_STACK):
                start = time.perf_counter()
                for _ in range(calls):
                    policy.sample(obs, INSTRUCTION, samplers[name], g)
                times[name].append((time.perf_counter() - start) / calls * 1e3)
    return times


def calls_per_round(policy: DAGPolicy, obs: dict, slowest: SamplerConfig, budget: float) -> int:
    """Calls per (sampler, round) measurement: as many as the slowest sampler makes in ``budget`` seconds."""
    start = time.perf_counter()
    policy.sample(obs, INSTRUCTION, slowest)
    return max(1, int(budget / (time.perf_counter() - start)))


def ratio(times: dict[str, list[float]], over: str, under: str = "success_only") -> float:
    """Median of the per-round ratios: both were measured side by side, so machine drift cancels."""
    return statistics.median(a / b for a, b in zip(times[over], times[under], strict=True))


def time_prefix(policy: DAGPolicy, obs: dict, rounds: int, calls: int) -> float:
    images = {c: obs[f"rgb_{c}"] for c in policy.cameras}
    samples = []
    with torch.no_grad():
        for _ in range(rounds):
            start = time.perf_counter()
            for _ in range(calls):
                policy.encode(obs["state"], images, INSTRUCTION)
            samples.append((time.perf_counter() - start) / calls * 1e3)
    return statistics.median(samples)


def build(cfg: PolicyConfig, cameras: tuple[str, ...] = ()) -> DAGPolicy:
    torch.manual_seed(0)
    return DAGPolicy.from_config(cfg, STATE_DIM, ACTION_DIM, cameras).eval()


RANK_SAMPLERS = {
    "success_only": SamplerConfig(kind="success_only"),
    "rank k=1": SamplerConfig(kind="rank", k=1),
    "rank k=4": SamplerConfig(kind="rank", k=4),
    "rank k=8": SamplerConfig(kind="rank", k=8),
    "rank k=8 pick=random": SamplerConfig(kind="rank", k=8, pick="random"),
    "outcome w=1": SamplerConfig(kind="outcome", w=1.0),
    "adaptive": SamplerConfig(kind="adaptive", lam=1.0),
}


def rank_table(args: argparse.Namespace) -> None:
    """Issue 22's samplers per chunk against success only and the paper's adaptive rule: ``rank`` (K candidates in
    one batched success-head call plus one critic call) and ``outcome`` (the success head twice per step)."""
    cfg = dataclasses.replace(PolicyConfig(), critic=True, outcome_conditioning=True)
    policy = build(cfg)
    print(f"## Issue 22's samplers (default policy with a critic and outcome tokens, {torch.get_num_threads()} "
          "threads)\n")
    names = list(RANK_SAMPLERS)
    print("| batch | " + " | ".join(f"{n} ms" for n in names) + " | "
          + " | ".join(f"{n} / success_only" for n in names[1:]) + " |")
    print("|---" * (2 * len(names)) + "|")
    for batch in args.batches:
        obs = observation(batch, (), 0)
        calls = calls_per_round(policy, obs, RANK_SAMPLERS["rank k=8"], args.budget)
        t = time_samplers(policy, obs, RANK_SAMPLERS, args.rounds, calls)
        print(f"| {batch} | " + " | ".join(f"{statistics.median(t[n]):.2f}" for n in names) + " | "
              + " | ".join(f"{ratio(t, n):.2f}" for n in names[1:]) + " |", flush=True)
    print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32, 64])
    parser.add_argument("--no-variants", action="store_true", help="only the first table")
    parser.add_argument("--rank", action="store_true", help="also the table of issue 22's samplers (rank, outcome)")
    parser.add_argument("--rank-only", action="store_true", help="only the table of issue 22's samplers")
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--budget", type=float, default=0.25, help="seconds per (sampler, round) measurement")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.rank_only:
        rank_table(args)
        return

    cfg = PolicyConfig()
    policy = build(cfg)
    counts = policy.num_parameters()
    print(f"# Sampling latency per chunk\n\n{platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"torch {torch.__version__}; policy: default PolicyConfig (backbone {cfg.hidden_size} wide x "
          f"{cfg.num_layers} layers, heads {cfg.head_width} x {cfg.head_depth}), state {STATE_DIM}, action "
          f"{ACTION_DIM}, H = {cfg.horizon}, K = {SamplerConfig().steps}; median of {args.rounds} interleaved "
          "rounds.\n")
    print("| batch | prefix only ms | " + " | ".join(f"{n} ms" for n in SAMPLERS)
          + " | adaptive / success_only | stacked / success_only | two calls / success_only | stacked / two calls |")
    print("|---" * (len(SAMPLERS) + 6) + "|")
    for batch in args.batches:
        obs = observation(batch, (), 0)
        calls = calls_per_round(policy, obs, SAMPLERS["adaptive"], args.budget)
        t = time_samplers(policy, obs, SAMPLERS, args.rounds, calls)
        prefix = time_prefix(policy, obs, args.rounds, calls)
        print(f"| {batch} | {prefix:.2f} | " + " | ".join(f"{statistics.median(t[n]):.2f}" for n in SAMPLERS)
              + f" | {ratio(t, 'adaptive'):.2f} | {ratio(t, 'adaptive, stacked'):.2f} | "
              f"{ratio(t, 'adaptive, two calls'):.2f} | {ratio(t, 'adaptive, stacked', 'adaptive, two calls'):.2f} |",
              flush=True)

    total = sum(counts.values())
    print(f"\nParameters: backbone {counts['backbone']:,}, success head {counts['success_head']:,}, failure head "
          f"{counts['failure_head']:,} (+{100 * counts['failure_head'] / (total - counts['failure_head']):.1f}% over "
          f"backbone + success head).\n")

    if args.rank:
        rank_table(args)
    if args.no_variants:
        return
    batch = max(args.batches)
    variants = [
        ("default (equal heads)", cfg, ()),
        ("failure head 64 wide x 1", dataclasses.replace(cfg, failure_head_width=64, failure_head_depth=1), ()),
        ("failure head 32 wide x 1", dataclasses.replace(cfg, failure_head_width=32, failure_head_depth=1), ()),
        ("backbone 512 x 6 (equal heads)", dataclasses.replace(cfg, hidden_size=512, num_layers=6, num_heads=8), ()),
        ("default + 2 cameras (128 px, 64 patches each)", dataclasses.replace(cfg, image_size=128),
         ("base", "hand")),
    ]
    print(f"## What makes guidance cheap (batch {batch})\n")
    print("| setting | failure head params (% of rest) | prefix ms | success_only ms | adaptive ms | "
          "two calls ms | adaptive / success_only | two calls / success_only |")
    print("|---" * 8 + "|")
    samplers = {n: SAMPLERS[n] for n in ("success_only", "adaptive", "adaptive, two calls")}
    for name, vcfg, cameras in variants:
        vpolicy = build(vcfg, cameras)
        obs = observation(batch, cameras, 128)
        calls = calls_per_round(vpolicy, obs, SAMPLERS["adaptive"], args.budget)
        t = time_samplers(vpolicy, obs, samplers, args.rounds, calls)
        prefix = time_prefix(vpolicy, obs, args.rounds, calls)
        c = vpolicy.num_parameters()
        share = 100 * c["failure_head"] / (c["backbone"] + c["success_head"])
        print(f"| {name} | {c['failure_head']:,} ({share:.1f}%) | {prefix:.2f} | "
              f"{statistics.median(t['success_only']):.2f} | {statistics.median(t['adaptive']):.2f} | "
              f"{statistics.median(t['adaptive, two calls']):.2f} | {ratio(t, 'adaptive'):.2f} | "
              f"{ratio(t, 'adaptive, two calls'):.2f} |", flush=True)


if __name__ == "__main__":
    main()
