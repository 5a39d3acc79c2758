"""Training throughput per mode: samples/s of ``Trainer.train_step`` for success_only, failure_head and joint.

Run: ``.venv/bin/python benchmarks/bench_train.py [--config configs/state_cpu.yaml]`` (about 2 minutes on
2 cores; prints markdown). The policy and batch come from the config (default: the CPU state config used for the
closed-loop results); the data is a synthetic store of PullCube-sized episodes (state 31, action 8, 100 steps;
demos, and failures with a sampled chunk every 8 steps), because throughput depends on shapes, not values.
Modes run in interleaved rounds (each mode once per round, order rotating); the table gives medians, and the
ratios are medians of per-round ratios. A sample is one (window, head) pair: joint trains both heads on a
batch each, so it processes 2 x batch_size samples per step.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from afil_ray.config import load_config
from afil_ray.replay.episode import Episode
from afil_ray.replay.store import ReplayStore
from afil_ray.train import Trainer

STATE_DIM, ACTION_DIM, LENGTH, H = 31, 8, 100, 16
MODES = ("success_only", "failure_head", "joint")  # the action heads' modes (the critic is an MLP beside them)


def synthetic_store(root: Path, episodes: int = 64) -> None:
    rng = np.random.default_rng(0)
    eps = []
    for i in range(episodes):
        outcome = "demo" if i % 2 == 0 else "failure"
        action = rng.uniform(-1, 1, (LENGTH, ACTION_DIM)).astype(np.float32)
        steps = list(range(0, LENGTH, 8)) if outcome == "failure" else []
        eps.append(Episode(
            task="PullCube-v1", outcome=outcome, seed=i, source="bench",
            state=rng.standard_normal((LENGTH, STATE_DIM)).astype(np.float32), action=action,
            reward=np.zeros(LENGTH, np.float32), step_success=np.zeros(LENGTH, bool),
            terminated=np.zeros(LENGTH, bool), truncated=np.arange(LENGTH) == LENGTH - 1,
            final_state=np.zeros(STATE_DIM, np.float32), chunk_steps=steps,
            chunks=np.stack([rng.uniform(-1, 1, (H, ACTION_DIM)).astype(np.float32) for _ in steps]) if steps
            else None))
    ReplayStore(root).write_episodes(eps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/state_cpu.yaml")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=20, help="optimizer steps per mode per round")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_store(tmp / "store")
        base = Trainer(load_config(args.config, [f"replay.root={tmp / 'store'}", f"run_dir={tmp / 'base'}",
                                                 "train.steps=1", f"train.num_threads={args.threads}"]),
                       progress=False, tensorboard=False)
        start = base.save()
        trainers = {}
        for mode in MODES:
            cfg = load_config(args.config, [f"replay.root={tmp / 'store'}", f"run_dir={tmp / mode}",
                                            f"train.mode={mode}", f"train.init_from={start}",
                                            f"train.num_threads={args.threads}"])
            trainers[mode] = Trainer(cfg, progress=False, tensorboard=False)
        batch = base.cfg.train.batch_size
        per_step = {m: batch * (2 if m == "joint" else 1) for m in MODES}
        rates: dict[str, list[float]] = {m: [] for m in MODES}
        for t in trainers.values():  # warm-up
            t.train_step()
        for r in range(args.rounds):
            order = list(MODES[r % 3:] + MODES[: r % 3])
            for mode in order:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainers[mode].train_step()
                rates[mode].append(per_step[mode] * args.steps / (time.perf_counter() - t0))
        counts = base.policy.num_parameters()
        trainable = {m: sum(p.numel() for p in trainers[m].params) for m in MODES}
    print(f"config {args.config}: batch {batch}, H {base.cfg.policy.horizon}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps\n")
    print("| mode | samples/s (median) | steps/s | trainable parameters | vs success_only |")
    print("|---|---|---|---|---|")
    for m in MODES:
        ratio = statistics.median(a / b for a, b in zip(rates[m], rates["success_only"], strict=True))
        med = statistics.median(rates[m])
        print(f"| {m} | {med:,.0f} | {med / per_step[m]:.1f} | {trainable[m]:,} | {ratio:.2f} |")
    total = counts["backbone"] + counts["success_head"]
    print(f"\nParameters: backbone {counts['backbone']:,}; success head {counts['success_head']:,}; failure head "
          f"{counts['failure_head']:,} (+{100 * counts['failure_head'] / total:.1f}% over backbone + success head)")


if __name__ == "__main__":
    main()
