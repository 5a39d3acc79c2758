"""How early could any alarm that reads the state know? A probe on an alarm study's own rollouts.

Every signal of `afil-ray alarm` reads the state the policy sees (in state mode: joints, the hand's pose, every
object's pose) through a model trained for something else: the critic on branches and the harvest, the heads on
demos and failures. This probe trains the most direct reader instead: gradient-boosted trees that predict, from the
state and the step at each re-planning step, whether *this* episode fails, on the study's own episodes
(cross-fitted: each episode is scored by trees that never saw its initial state, ``--folds`` folds by a hash of it;
a failure's steps after its point of no return are left out of training, as the study's combination leaves them).
The result goes through the study's own measurement (time-aware, ``detect.combiner``, the same folds and draws),
beside the signals the study kept. If this reader flags no more failures before their point of no return than the
critic does, the state at those steps does not yet tell the failure apart, and no better model of it will.

    .venv/bin/python scripts/alarm_oracle.py runs/fs_LiftPegUpright --signals critic,chosen --splits 3
"""

from __future__ import annotations

import argparse
import hashlib
from pathlib import Path

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier

from afil_ray.config import ConfigError
from afil_ray.detect.alarm import STEP, ScoredEpisode, evaluate_alarm
from afil_ray.detect.signals import hold, scored_steps
from afil_ray.detect.study import kept_study
from afil_ray.replay.episode import Episode

ORACLE = "state reader"


def fold_of(initial_state: str, folds: int) -> int:
    """The probe's own folds, drawn apart from the study's (another hash), by initial state."""
    return int.from_bytes(hashlib.blake2b(f"oracle:{initial_state}".encode(), digest_size=4).digest(), "little") % folds


def rows(episode: Episode, every: int, point: int | None, training: bool) -> tuple[np.ndarray, np.ndarray]:
    """(features [n, state + 1], steps [n]) at the episode's re-planning steps; for training, a failure's steps
    after its point of no return are dropped."""
    steps = scored_steps(episode, every)
    if training and not episode.success and point is not None:
        steps = steps[steps <= point]
    return np.column_stack([episode.state[steps], steps]).astype(np.float32), steps


def state_reader_scores(episodes: list[Episode], points: dict[str, int], every: int, folds: int,
                        seed: int = 0) -> list[np.ndarray]:
    """Each episode's per-step P(fail | state, step), from trees trained on the other folds' episodes."""
    fold = [fold_of(f"{e.task}:{e.seed}", folds) for e in episodes]
    scores: list[np.ndarray | None] = [None] * len(episodes)
    for k in range(folds):
        train_x, train_y = [], []
        for e, f in zip(episodes, fold, strict=True):
            if f != k:
                x, _ = rows(e, every, points.get(e.episode_id), training=True)
                train_x.append(x)
                train_y.append(np.full(len(x), not e.success))
        model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, early_stopping=True,
                                               random_state=seed)
        model.fit(np.concatenate(train_x), np.concatenate(train_y))
        for i, e in enumerate(episodes):
            if fold[i] == k:
                x, steps = rows(e, every, None, training=False)
                scores[i] = hold(model.predict_proba(x)[:, 1], steps, e.length)
    return [s for s in scores if s is not None]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--signals", default="critic,chosen", help="kept signals to show beside it, by commas")
    parser.add_argument("--splits", type=int, default=3, help="draws of the study's folds")
    parser.add_argument("--folds", type=int, default=5, help="the state reader's cross-fitting folds")
    parser.add_argument("--alpha", type=float, default=0.05)
    args = parser.parse_args()
    signals = [s for s in args.signals.split(",") if s]
    try:
        cfg, episodes, points, kept = kept_study(args.run_dir, signals)
    except ConfigError as error:
        raise SystemExit(str(error)) from None
    reader = state_reader_scores(episodes, points, cfg.sampler.execute_steps, args.folds, cfg.seed)
    scored = [ScoredEpisode(e.episode_id, e.success, {**{s: kept[s][i] for s in signals}, ORACLE: reader[i]},
                            points.get(e.episode_id), initial_state=f"{e.task}:{e.seed}")
              for i, e in enumerate(episodes)]
    with_point = sum(e.point_of_no_return is not None for e in scored if not e.success)
    print(f"{cfg.env.tasks[0]}: {len(scored)} episodes, {sum(not e.success for e in scored)} failures, "
          f"{with_point} with a point of no return; time-aware, {cfg.detect.combiner}, alpha {args.alpha}")
    names = [STEP, *signals, ORACLE]
    print("| alarm | AUROC at 25% (draw 0) | flagged before the point of no return, per draw | false alarms |")
    print("|---|---|---|---|")
    by_split = [{r.signal: r for r in evaluate_alarm(scored, [*signals, ORACLE], args.alpha, combine=False,
                                                     combiner=cfg.detect.combiner, split=split, time_aware=True)}
                for split in range(args.splits)]
    for name in names:
        counts = " / ".join(f"{round(r[name].flagged_in_time * with_point)}" for r in by_split)
        fa = " / ".join(f"{r[name].false_alarm_rate:.3f}" for r in by_split)
        auc = by_split[0][name].auroc[0.25]
        print(f"| {name} | {'—' if auc is None else f'{auc:.3f}'} | {counts} | {fa} |")


if __name__ == "__main__":
    main()
