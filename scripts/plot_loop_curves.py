"""Loop runs side by side: each run's rolling success rate per task against env steps, one panel per task, from the
TensorBoard event files the driver writes (``afil_ray/loop/metrics.py``). Issue 22's online figure: two loops
started from the same checkpoint, one learning with the best sampler, one with the paper's rule.

    python scripts/plot_loop_curves.py --run "rank k=8, critic=runs/online_rank/tb" \\
        --run "paper's rule=runs/online_rule/tb" --out docs/figures/online_pullcube.png

Each ``--run LABEL=DIR`` names a directory holding event files (searched below it, so a run directory's ``tb/``
with one folder per run id works); several event files below one DIR are read as one run, in step order.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

TAG = "rollout/success_rate_rolling/"


def curves(directory: Path, prefix: str = TAG) -> dict[str, tuple[list[int], list[float]]]:
    """Per task (the tag's last part): (env steps, values) of every scalar under ``prefix`` in the event files
    below ``directory``."""
    folders = sorted({p.parent for p in directory.rglob("events.out.tfevents.*")})
    if not folders:
        raise SystemExit(f"{directory}: no TensorBoard event files below it")
    points: dict[str, dict[int, float]] = {}
    for folder in folders:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0}).Reload()
        for tag in events.Tags()["scalars"]:
            if tag.startswith(prefix):
                points.setdefault(tag.removeprefix(prefix), {}).update(
                    {e.step: e.value for e in events.Scalars(tag)})
    if not points:
        raise SystemExit(f"{directory}: no scalars under {prefix!r}")
    return {task: (sorted(p), [p[s] for s in sorted(p)]) for task, p in sorted(points.items())}


def plot(runs: dict[str, Path], out: Path, prefix: str = TAG) -> None:
    read = {label: curves(path, prefix) for label, path in runs.items()}
    tasks = sorted({t for c in read.values() for t in c})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for label, c in read.items():
            if task in c:
                ax.plot(*c[task], label=label)
        ax.set(title=task, xlabel="env steps", ylabel=prefix.rstrip("/").split("/")[-1].replace("_", " "),
               ylim=(-0.02, 1.02))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", action="append", required=True, metavar="LABEL=DIR")
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--prefix", default=TAG, help="scalar tag prefix; the rest of the tag names the panel")
    args = parser.parse_args()
    runs = {}
    for spec in args.run:
        label, sep, path = spec.rpartition("=")
        if not sep or not label:
            raise SystemExit(f"--run {spec!r}: expected LABEL=DIR")
        runs[label] = Path(path)
    plot(runs, args.out, args.prefix)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
