"""Does an alarm gain from the signals' recent history? A probe on the scores an alarm study kept.

`afil-ray alarm` judges every step by the signals at that step (and the step). A failure may show as a score that
stays doubtful for a while rather than one doubtful step, so this probe adds, for each signal, its mean over the
last ``--window`` steps (what a live monitor could keep) and measures, on the study's own episodes and folds
(time-aware, ``detect.combiner``), every single signal, raw and smoothed, and the combination of all of them,
each against the combination, over ``--splits`` draws of the folds. It reads ``run_dir/detect/scores_*_fresh.npz``
and the study's rollouts; it scores nothing itself.

    .venv/bin/python scripts/alarm_history.py runs/fs_PullCube --window 10 --splits 3
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from tqdm import tqdm

from afil_ray.config import ConfigError
from afil_ray.detect.alarm import COMBINED, STEP, ScoredEpisode, against_combination, evaluate_alarm
from afil_ray.detect.study import kept_study


def trailing_mean(x: np.ndarray, window: int) -> np.ndarray:
    """Each step's mean over itself and the ``window - 1`` steps before it (fewer at the start)."""
    total = np.cumsum(np.insert(x, 0, 0.0))
    t = np.arange(len(x))
    low = np.maximum(0, t - window + 1)
    return (total[t + 1] - total[low]) / (t + 1 - low)


def scored_episodes(root: Path, window: int, signals: list[str] | None = None
                    ) -> tuple[list[ScoredEpisode], list[str], str]:
    cfg, episodes, points, kept = kept_study(root, signals)
    scores: list[dict[str, np.ndarray]] = [{} for _ in episodes]
    raw = list(kept)
    for signal in raw:
        for mine, held in zip(scores, kept[signal], strict=True):
            mine[signal] = held
            mine[f"{signal} mean{window}"] = trailing_mean(held, window)
    scored = [ScoredEpisode(e.episode_id, e.success, s, points.get(e.episode_id), initial_state=f"{e.task}:{e.seed}")
              for e, s in zip(episodes, scores, strict=True)]
    return scored, [*raw, *(f"{s} mean{window}" for s in raw)], cfg.detect.combiner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--window", type=int, default=10)
    parser.add_argument("--splits", type=int, default=3)
    parser.add_argument("--alpha", type=float, default=0.05)
    parser.add_argument("--signals", help="signals separated by commas (default: the reproduction's detect.signals)")
    args = parser.parse_args()
    try:
        scored, signals, combiner = scored_episodes(args.run_dir, args.window,
                                                    args.signals.split(",") if args.signals else None)
    except ConfigError as error:  # no study has rolled out there yet
        raise SystemExit(str(error)) from None
    with_point = sum(not e.success and e.point_of_no_return is not None for e in scored)
    in_time: dict[str, list[int]] = {}
    false_alarms: dict[str, list[float]] = {}
    deltas: dict[str, list[tuple[float, float, float]]] = {}
    for split in tqdm(range(args.splits), desc="fold draws", unit="draw"):
        reports = evaluate_alarm(scored, signals, alpha=args.alpha, combiner=combiner, split=split, time_aware=True)
        for r in reports:
            in_time.setdefault(r.signal, []).append(round(r.flagged_in_time * r.with_point))
            false_alarms.setdefault(r.signal, []).append(r.false_alarm_rate)
        for p in against_combination(reports, scored):
            deltas.setdefault(p.signal, []).append((p.in_time.difference, p.in_time.diff_low, p.in_time.diff_high))
    print(f"{args.run_dir}: {len(scored)} episodes, {with_point} failures with a point of no return; time-aware "
          f"{combiner} alarms at alpha={args.alpha}, window {args.window}, {args.splits} draws of the folds\n")
    print("| alarm | flagged in time, per draw | false alarms (mean) | combination minus it, per draw [95% CI] |")
    print("|---|---|---|---|")
    for signal in [STEP, *signals, COMBINED]:
        delta = "; ".join(f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]" for d, lo, hi in deltas.get(signal, []))
        print(f"| {signal} | {', '.join(map(str, in_time[signal]))} of {with_point} | "
              f"{np.mean(false_alarms[signal]):.3f} | {delta or '—'} |")


if __name__ == "__main__":
    main()
