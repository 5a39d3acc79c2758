"""Paired comparison of arms from different evaluations (different checkpoints, same seeds x runs).

``afil-ray eval`` compares the arms of one checkpoint; evaluations of other checkpoints on the same seed set draw
the same per-episode noise, so their episodes pair up too. The first arm is the reference.

    python scripts/compare_evals.py \\
        --arm "+ failure correction" runs/repro_liftpeg/dag/eval/<dir>/episodes.json success_only \\
        --arm "suffix only" runs/repro_liftpeg/corrected_suffix/eval/<dir>/episodes.json success_only
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from afil_ray.eval.protocol import load_outcomes
from afil_ray.eval.report import ArmResult, build_report, markdown_table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arm", nargs=3, action="append", required=True, metavar=("LABEL", "EPISODES_JSON", "ARM"),
                        help="an arm of one evaluation, named LABEL in the table; the first is the reference")
    parser.add_argument("--metric", default="success_once")
    args = parser.parse_args()
    results = []
    for label, path, arm in args.arm:
        outcomes = load_outcomes(path)
        if arm not in outcomes:
            raise SystemExit(f"{path} has no arm {arm!r} (it has {sorted(outcomes)})")
        task = json.loads(Path(path).read_text())["episodes"][0]["task"]
        results.append(ArmResult(label, task, outcomes[arm]))
    report = build_report(results, metric=args.metric, reference_arm=results[0].arm)
    print(markdown_table(report))


if __name__ == "__main__":
    main()
