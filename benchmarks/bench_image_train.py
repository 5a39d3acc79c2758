"""Training throughput of the image-and-language policy against the state policy: samples/s of
``Trainer.train_step`` with frozen pretrained encoders (EfficientNet-Lite0, MiniLM) re-run on every batch, with
the frame-feature cache (``train.feature_cache``), and for the state policy on the same episodes; and the set-up
of a second trainer on the same store, which reads the features the first wrote to disk
(``train.feature_cache_dir``) instead of encoding every stored frame again.

Run: ``.venv/bin/python benchmarks/bench_image_train.py`` (about 3 minutes on 2 cores; prints markdown). The data
is a synthetic store of PullCube-sized rgb episodes (state 28, action 8, 60 steps, one 128-pixel camera), since
throughput depends on shapes, not values. Variants run in interleaved rounds (order rotating); the table gives
medians and medians of per-round ratios against the state policy.
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

STATE_DIM, ACTION_DIM, LENGTH, CAMERA = 28, 8, 60, 128
ENCODERS = ["policy.vision_encoder=efficientnet_lite0", "policy.language_encoder=minilm"]
VARIANTS = {
    "state policy": ["env.obs_mode=state"],
    "image + language, encoders every batch": ["env.obs_mode=rgb", *ENCODERS, "train.feature_cache=false"],
    "image + language, cached frame features": ["env.obs_mode=rgb", *ENCODERS, "train.feature_cache=true"],
    # built after the one above, in another run_dir: a later stage on the same store reads what it wrote
    "image + language, features from the disk cache": ["env.obs_mode=rgb", *ENCODERS, "train.feature_cache=true"],
}


def synthetic_store(root: Path, episodes: int) -> None:
    rng = np.random.default_rng(0)
    ReplayStore(root).write_episodes([Episode(
        task="PullCube-v1", outcome="demo", seed=i, source="bench", obs_mode="rgb",
        state=rng.standard_normal((LENGTH, STATE_DIM)).astype(np.float32),
        action=rng.uniform(-1, 1, (LENGTH, ACTION_DIM)).astype(np.float32),
        reward=np.zeros(LENGTH, np.float32), step_success=np.zeros(LENGTH, bool),
        terminated=np.zeros(LENGTH, bool), truncated=np.arange(LENGTH) == LENGTH - 1,
        final_state=np.zeros(STATE_DIM, np.float32),
        images={"base_camera": rng.integers(0, 256, (LENGTH, CAMERA, CAMERA, 3), dtype=np.uint8)})
        for i in range(episodes)])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per variant per round")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--image-size", type=int, default=128, help="policy.image_size (the encoder's input)")
    p.add_argument("--episodes", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_store(tmp / "store", args.episodes)
        trainers: dict[str, Trainer] = {}
        setup: dict[str, float] = {}
        for name, overrides in VARIANTS.items():
            t0 = time.perf_counter()
            cfg = load_config("configs/state_cpu.yaml", [
                *overrides, f"replay.root={tmp / 'store'}", f"run_dir={tmp / name.replace(' ', '_')}",
                f"train.batch_size={args.batch}", f"train.num_threads={args.threads}",
                f"policy.image_size={args.image_size}", "train.ema_decay=0",
                f"train.feature_cache_dir={tmp / 'features'}"])
            trainers[name] = Trainer(cfg, progress=False, tensorboard=False)
            trainers[name].train_step()  # warm-up
            setup[name] = time.perf_counter() - t0
        rates: dict[str, list[float]] = {n: [] for n in VARIANTS}
        names = list(VARIANTS)
        for r in range(args.rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    trainers[name].train_step()
                rates[name].append(args.batch * args.steps / (time.perf_counter() - t0))
    frames = args.episodes * LENGTH
    print(f"batch {args.batch}, {args.threads} threads, {args.episodes} episodes x {LENGTH} steps ({frames} frames, "
          f"{CAMERA}-pixel camera, policy.image_size {args.image_size}), {args.rounds} rounds x {args.steps} steps\n")
    print("| variant | samples/s (median) | vs state policy | set-up incl. first step (s) |")
    print("|---|---|---|---|")
    base = rates["state policy"]
    for name in VARIANTS:
        ratio = statistics.median(a / b for a, b in zip(rates[name], base, strict=True))
        print(f"| {name} | {statistics.median(rates[name]):,.0f} | {ratio:.2f} | {setup[name]:.1f} |")


if __name__ == "__main__":
    main()
