"""docs/figures/study_<task>.png: the failure-head study, each arm's paired Δ vs "+ failure correction" against the
mean guidance weight it actually applied (from ``run_dir/results/variants/report.json``).

    python scripts/plot_study.py runs/repro_liftpeg_v2 docs/figures/study_liftpeg_v2.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def main(run_dir: str, out: str) -> None:
    report = json.loads((Path(run_dir) / "results" / "variants" / "report.json").read_text())
    (task, entry), = report["tasks"].items()
    mean_w = report.get("mean_w", {})
    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {}
    for arm in entry["arms"]:
        cmp, w = arm.get("comparison"), mean_w.get(arm["arm"])
        if cmp is None or not w:
            continue
        variant = arm["arm"].split(":")[0]
        first = variant not in markers
        index = markers.setdefault(variant, len(markers))
        ax.errorbar(w, cmp["difference"], yerr=[[cmp["difference"] - cmp["diff_low"]],
                                                [cmp["diff_high"] - cmp["difference"]]],
                    fmt="osD^vP*X"[index % 8], color=f"C{index}", capsize=3, label=variant if first else None)
    ax.axhline(0, color="grey", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("mean guidance weight applied (w; static arms: w itself)")
    ax.set_ylabel('Δ success vs "+ failure correction" (paired, 95% bootstrap)')
    ax.set_title(f"{task}: failure-head variants, 150 paired episodes per arm")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    print(out)


if __name__ == "__main__":
    main(*sys.argv[1:3])
