"""Training curves from TensorBoard event files, as PNGs for docs/.

    .venv/bin/python benchmarks/plot_training.py OUT.png RUN_DIR[:LABEL] [RUN_DIR[:LABEL] ...]
"""

from __future__ import annotations

import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def main(out: str, runs: list[str]) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for spec in runs:
        run, _, label = spec.partition(":")
        events = EventAccumulator(f"{run}/tb")
        events.Reload()
        for tag in ("losses/success_head", "losses/failure_head"):
            if tag in events.Tags()["scalars"]:
                points = events.Scalars(tag)
                ax.plot([p.step for p in points], [p.value for p in points],
                        label=f"{label or run} ({tag.split('/')[-1]})")
    ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel("flow-matching loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
