"""docs/figures/failure_signal_tasks.png: issue 22's rows against success only, over the training seeds, per task.

Each point is a row's mean paired difference from success only over the seeds ([95% bootstrap over episodes]), one
colour per task, read from the ``over_seeds`` block of each task's ``results/seeds/spread.json`` (kept in
docs/records as ``fs_<task>.spread.json``). A row whose interval lies right of zero beats success only there.

    python scripts/plot_failure_signal.py docs/records/fs_*.spread.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REFERENCE = "success only"


def load(path: Path) -> dict[str, dict]:
    """The rows' comparisons with success only over the seeds, by row name."""
    try:
        rows = json.loads(path.read_text())["over_seeds"][REFERENCE]
    except (OSError, json.JSONDecodeError, KeyError) as error:
        raise SystemExit(f"{path}: not a seeds spread file with over_seeds['{REFERENCE}'] ({error!r})") from None
    return rows


def task_name(path: Path) -> str:
    return path.name.split(".")[0].removeprefix("fs_")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("spreads", type=Path, nargs="+", help="fs_<task>.spread.json files")
    parser.add_argument("--out", type=Path, default=Path("docs/figures/failure_signal_tasks.png"))
    args = parser.parse_args()
    tasks = {task_name(p): load(p) for p in args.spreads}
    arms = list(dict.fromkeys(arm for rows in tasks.values() for arm in rows))
    fig, ax = plt.subplots(figsize=(10.5, 0.45 * len(arms) + 2))
    offset = 0.8 / max(len(tasks), 1)
    for t, (task, rows) in enumerate(tasks.items()):
        ys, xs, lo, hi = [], [], [], []
        for a, arm in enumerate(arms):
            if arm in rows:
                row = rows[arm]
                ys.append(a + (t - (len(tasks) - 1) / 2) * offset)
                xs.append(row["difference"])
                lo.append(row["difference"] - row["diff_low"])
                hi.append(row["diff_high"] - row["difference"])
        rate = next(iter(rows.values()))["reference_rate"]
        ax.errorbar(xs, ys, xerr=[lo, hi], fmt="o", capsize=2, markersize=4,
                    label=f"{task} (success only {rate:.3f})")
    ax.axvline(0.0, color="grey", linewidth=0.8)
    ax.set_yticks(range(len(arms)), arms)
    ax.invert_yaxis()
    ax.set_xlabel("Δ success vs success only (mean over training seeds, 95% CI over episodes)")
    fig.suptitle("Issue 22's rows against success only, per task")
    ax.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=len(tasks), fontsize=8, frameon=False)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=90)
    print(args.out)


if __name__ == "__main__":
    main()
