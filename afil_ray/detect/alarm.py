"""How good a runtime alarm is: early AUROC, failures flagged before their point of no return, lead time.

Episodes are split in two folds by a hash of their initial state (cross-fitting): what needs fitting (the
combination of signals, the conformal threshold on successes) is fitted on one fold and measured on the other, then
the other way round, and the two halves are pooled, so every number is on episodes nothing was fitted on, not even
another noise draw of the same initial state.

- AUROC at a fraction f of the episode: each episode scored by its largest score over its first f of steps
  (what the alarm has seen by then), failures against successes.
- The alarm fires at the first step above the threshold calibrated on the other fold's successes for false-alarm
  rate ``alpha`` (afil_ray/detect/conformal.py); the false-alarm rate is measured on this fold's successes. A
  time-aware alarm (``time_aware``) is a model of its score and the step, fitted and calibrated like the
  combination below: its threshold falls as a success's early doubt fades.
- A failure's point of no return is the latest step from which the planner still completed it (the correction's
  restore point): it counts as flagged in time when its alarm fires at or before that step, and its lead time is
  the number of steps between the two.

The combination is learned from the signals' per-step scores (labels: the episode failed; a failure's steps after
its point of no return left out, since the alarm is judged on the steps before it), as FIPER combines its
two scores with a learned rule rather than a fixed one: a logistic regression on the standardised scores
(``logistic``), or gradient-boosted trees constrained to be monotone in every signal (``boosted``: it can learn
"both high" or "one very high", which a weighted sum cannot; trees give whole regions one score, so their ties
are broken by the mean standardised signal, or the threshold lands on the top value and the alarm never fires). Its
threshold is calibrated on successes it was not fitted on (a flexible model fits its own training successes' scores
low, and a threshold set on them would fire too often): the other fold is halved by a second hash of the initial
state, and a combination fitted on each half, with its threshold calibrated on the other half's successes, judges
the measured episodes that hash to its half. One fit and one threshold judging every measured episode made the
combination's count swing by a fifth from one draw of the folds to another; two independent ones average.

Whether the combination beats a signal is a paired question (``against_combination``): the same failures flagged
in time or not by each, the same successes falsely alarmed or not, so a paired test says whether a gain of a few
failures is more than the thresholds' noise. Noise draws of one initial state are not independent pairs: the test
and the interval resample initial states (``compare_paired_clustered``); McNemar's test, which counts every episode
as one pair, is shown beside them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from afil_ray.config import DETECT_COMBINERS
from afil_ray.detect.conformal import calibrate, first_alarm
from afil_ray.eval.critic import auroc
from afil_ray.eval.stats import ClusteredComparison, PairedComparison, compare_paired, compare_paired_clustered

FRACTIONS = (0.25, 0.5, 0.75)
COMBINED = "combined"
STEP = "step alone"  # a time-aware alarm's baseline: how long the episode has run, no signal (failures run longer)
COMBINERS = DETECT_COMBINERS


@dataclass(frozen=True)
class ScoredEpisode:
    episode_id: str
    success: bool
    scores: dict[str, np.ndarray]  # signal -> per-step scores [T]
    point_of_no_return: int | None = None  # failures the planner corrected: the latest step it could still win from
    initial_state: str | None = None  # episodes rolled out from one initial state share it (None: its own)

    @property
    def length(self) -> int:
        return len(next(iter(self.scores.values())))

    @property
    def cluster(self) -> str:
        """What the folds and the paired tests keep together: the initial state."""
        return self.episode_id if self.initial_state is None else self.initial_state


class TooFewEpisodes(ValueError):
    """A fit that needs failures and successes in each half of each fold did not get them."""


def _salted(cluster: str, split: int) -> bytes:
    """What the folds are hashed from; ``split`` > 0 salts it, drawing other folds from the same episodes."""
    return (cluster if split == 0 else f"split{split}:{cluster}").encode()


def fold_of(cluster: str, split: int = 0) -> int:
    return hashlib.blake2b(_salted(cluster, split), digest_size=1).digest()[0] % 2


def calibration_half(cluster: str, split: int = 0) -> bool:
    """Which half of its fold an episode falls in (each half's combination scores the other half): a hash
    independent of the fold's."""
    return hashlib.blake2b(_salted(cluster, split), digest_size=2).digest()[1] % 2 == 1


def early_score(scores: np.ndarray, fraction: float) -> float:
    """The largest score over the first ``fraction`` of the steps (at least one step)."""
    return float(np.max(scores[: max(1, int(np.ceil(fraction * len(scores))))]))


class Combination:
    """A learned map from the signals' per-step scores to a failure score (higher: more likely to fail).

    ``with_step`` adds the episode's step as a feature the score need not rise with: what a score means depends on
    when it is seen (a success's critic reads uncertain at the start and sure near the end), so a fixed threshold
    must sit above every success's early doubt and fires late; a model of (score, step) is a time-varying threshold
    (FAIL-Detect calibrates its bands per step for the same reason)."""

    def __init__(self, signals: Sequence[str], kind: str = "logistic", with_step: bool = False) -> None:
        if kind not in COMBINERS:
            raise ValueError(f"combiner {kind!r} is not one of {', '.join(COMBINERS)}")
        self.signals, self.kind, self.with_step = tuple(signals), kind, with_step

    def fit(self, episodes: Sequence[ScoredEpisode]) -> Combination:
        from sklearn.ensemble import HistGradientBoostingClassifier
        from sklearn.linear_model import LogisticRegression
        from sklearn.pipeline import make_pipeline
        from sklearn.preprocessing import StandardScaler

        # what the alarm is for: telling a failure from a success while it can still be saved, so a failure's steps
        # after its point of no return (where every signal already says "failed") are left out of the fit
        steps = [e.length if e.success or e.point_of_no_return is None else min(e.length, e.point_of_no_return + 1)
                 for e in episodes]
        x = np.concatenate([self._features(e.scores, np.arange(e.length))[:n]
                            for e, n in zip(episodes, steps, strict=True)])
        y = np.concatenate([np.full(n, not e.success) for e, n in zip(episodes, steps, strict=True)])
        # every episode weighs the same, however many of its steps are fitted (failures run to the time limit)
        w = np.concatenate([np.full(n, 1.0 / n) for n in steps])
        if len(np.unique(y)) < 2:
            raise ValueError("combining signals needs failures and successes in the fitting fold")
        if self.kind == "logistic":
            self.model = make_pipeline(StandardScaler(), LogisticRegression())
            self.model.fit(x, y, logisticregression__sample_weight=w)
        else:  # monotone: a higher score of any signal never lowers the failure score
            self.model = HistGradientBoostingClassifier(
                max_iter=200, learning_rate=0.05, max_leaf_nodes=15, min_samples_leaf=100,
                monotonic_cst=[1] * len(self.signals) + [0] * self.with_step, early_stopping=False, random_state=0)
            with _one_thread():
                self.model.fit(x, y, sample_weight=w * len(episodes))  # weights summing to the episodes, as above
                trees = self.model.decision_function(x)
            # Trees score whole regions alike: where every signal is high, many successes share the top value, the
            # conformal threshold lands on it, and nothing ever exceeds it (the alarm goes silent). Ties are broken
            # by the mean standardised signal, scaled below the smallest step between the trees' values.
            self.tie_scaler = StandardScaler().fit(x)
            steps_between = np.diff(np.unique(trees))
            spread = np.ptp(self._tie_break(x))
            self.tie_weight = 0.0 if not len(steps_between) or spread == 0 else 0.5 * steps_between.min() / spread
        return self

    def _tie_break(self, x: np.ndarray) -> np.ndarray:
        if not self.signals:  # the step alone: nothing to break its ties with
            return np.zeros(len(x))
        return self.tie_scaler.transform(x)[:, :len(self.signals)].mean(axis=1)  # the signals, not the step

    def _features(self, scores: dict[str, np.ndarray], steps: np.ndarray | None) -> np.ndarray:
        columns = [scores[s] for s in self.signals]
        if self.with_step:
            if steps is None:
                raise ValueError("a combination with the step as a feature needs each row's step")
            columns.append(np.asarray(steps, np.float64))
        return np.stack(columns, axis=1)

    def __call__(self, episode: ScoredEpisode) -> np.ndarray:
        return self.rows(episode.scores, np.arange(episode.length))

    def episodes(self, episodes: Sequence[ScoredEpisode]) -> dict[str, np.ndarray]:
        """Each episode's combined per-step scores, by episode id, from one batched call."""
        if not episodes:
            return {}
        rows = self.rows({s: np.concatenate([e.scores[s] for e in episodes]) for s in self.signals},
                         np.concatenate([np.arange(e.length) for e in episodes]))
        ends = np.cumsum([e.length for e in episodes])[:-1]
        return {e.episode_id: part for e, part in zip(episodes, np.split(rows, ends), strict=True)}

    def rows(self, scores: dict[str, np.ndarray], steps: np.ndarray | None = None) -> np.ndarray:
        """The combined score of rows of signal scores ({signal: [B]}) at ``steps`` ([B], needed ``with_step``), as
        a live monitor computes it."""
        x = self._features(scores, steps)
        if self.kind == "logistic":
            return self.model.decision_function(x)
        with _one_thread():
            return self.model.decision_function(x) + self.tie_weight * self._tie_break(x)

    @property
    def coefficients(self) -> dict[str, float]:
        if self.kind != "logistic":
            raise ValueError(f"a {self.kind} combination has no coefficients")
        coef = self.model[-1].coef_[0]
        return {s: float(c) for s, c in zip(self.signals, coef, strict=True)}


def _one_thread():
    """Trees on a few thousand rows: OpenMP threads cost more than they give, and far more on busy cores."""
    from threadpoolctl import threadpool_limits

    return threadpool_limits(limits=1, user_api="openmp")


@dataclass
class SignalReport:
    signal: str
    auroc: dict[float, float | None]  # fraction of the episode -> AUROC
    false_alarm_rate: float  # on held-out successes
    detected: float  # share of failures whose alarm fires at all
    flagged_in_time: float | None  # share of failures with a point of no return flagged at or before it
    with_point: int  # failures with a point of no return
    median_lead: float | None  # steps from alarm to point of no return, over the failures flagged in time
    alarms: dict[str, int | None] = field(default_factory=dict, repr=False)  # episode id -> first alarm step
    # episode id -> the scores the alarm read (a fitted alarm's less its threshold, so it fires above 0)
    judged: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def row(self) -> list[str]:
        def show(x: float | None, fmt: str = "{:.3f}") -> str:
            return "—" if x is None else fmt.format(x)

        return [self.signal, *(show(self.auroc[f]) for f in FRACTIONS), show(self.false_alarm_rate),
                show(self.detected), show(self.flagged_in_time), str(self.with_point),
                show(self.median_lead, "{:.0f}")]


def evaluate_alarm(episodes: Sequence[ScoredEpisode], signals: Sequence[str], alpha: float = 0.05,
                   combine: bool = True, combiner: str = "logistic", split: int = 0,
                   time_aware: bool = False) -> list[SignalReport]:
    """One report per signal (and their ``combiner`` combination), each measured on the fold nothing was fitted on:
    for fold k, a single signal's threshold is calibrated on the other fold's successes; the combination is fitted
    on each half of the other fold and calibrated on the other half (``_cross_fitted``). ``split`` salts the
    hashes that draw the folds and halves. ``time_aware``: every alarm, each single signal's too, is a ``combiner``
    model of its score(s) and the step, fitted and calibrated like the combination (a time-varying threshold), and
    a model of the step alone (``STEP``) reports what elapsed time says by itself."""
    folds = [[e for e in episodes if fold_of(e.cluster, split) == k] for k in (0, 1)]
    halves = [[[e for e in fold if calibration_half(e.cluster, split) == h] for h in (False, True)]
              for fold in folds]
    # every half fits a combination, so each needs failures and successes
    both = all(len({e.success for e in half}) == 2 for fold in halves for half in fold)
    if time_aware and not both:
        raise TooFewEpisodes("a time-aware alarm is fitted on each half of each fold, and a half of these folds "
                             "lacks failures or successes")
    # alarm -> k -> fold k's episode id -> scores less their threshold
    fitted: dict[str, list[dict[str, np.ndarray]]] = {}
    if time_aware:
        fitted = {s: [_cross_fitted([] if s == STEP else [s], combiner, halves[1 - k], folds[k], split, alpha,
                                    time_aware) for k in (0, 1)] for s in [STEP, *signals]}
    if combine and len(signals) > 1 and both:
        fitted[COMBINED] = [_cross_fitted(signals, combiner, halves[1 - k], folds[k], split, alpha, time_aware)
                            for k in (0, 1)]
    signals = [*([STEP] if time_aware else []), *signals, *([COMBINED] if COMBINED in fitted else [])]

    def scores_of(e: ScoredEpisode, signal: str, k: int) -> np.ndarray:
        return fitted[signal][k][e.episode_id] if signal in fitted else e.scores[signal]

    reports = []
    for signal in signals:
        early: dict[float, list[tuple[bool, float]]] = {f: [] for f in FRACTIONS}
        false_alarms, detected, in_time, leads = [], [], [], []
        alarms: dict[str, int | None] = {}
        judged: dict[str, np.ndarray] = {}
        for k in (0, 1):
            threshold = 0.0 if signal in fitted else calibrate(
                [scores_of(e, signal, k) for e in folds[1 - k] if e.success], alpha)
            for e in folds[k]:
                scores = judged[e.episode_id] = scores_of(e, signal, k)
                for f in FRACTIONS:
                    early[f].append((not e.success, early_score(scores, f)))
                alarm = first_alarm(scores, threshold)
                alarms[e.episode_id] = alarm
                if e.success:
                    false_alarms.append(alarm is not None)
                    continue
                detected.append(alarm is not None)
                if e.point_of_no_return is not None:
                    in_time.append(alarm is not None and alarm <= e.point_of_no_return)
                    if in_time[-1]:
                        leads.append(e.point_of_no_return - alarm)
        reports.append(SignalReport(
            signal,
            {f: auroc([y for y, _ in early[f]], [s for _, s in early[f]]) for f in FRACTIONS},
            float(np.mean(false_alarms)) if false_alarms else float("nan"),
            float(np.mean(detected)) if detected else float("nan"),
            float(np.mean(in_time)) if in_time else None, len(in_time),
            float(np.median(leads)) if leads else None,
            alarms, judged,
        ))
    return reports


def _cross_fitted(signals: Sequence[str], combiner: str, halves: Sequence[Sequence[ScoredEpisode]],
                  measured: Sequence[ScoredEpisode], split: int, alpha: float,
                  with_step: bool = False) -> dict[str, np.ndarray]:
    """The ``measured`` episodes' scores from a ``Combination`` of ``signals`` (one signal, or none, with the step),
    by episode id, less the threshold they are judged by (the alarm fires above 0): a model fitted on each of the
    calibrating fold's two ``halves``, its threshold calibrated on the other half's successes, judges the measured
    episodes whose initial state hashes to its half. Each episode is judged by one fit on a quarter of the episodes
    and one threshold on another quarter's successes, as with a single pair of halves, but the counts average two
    independent draws of both."""
    scores = {}
    for h, half in enumerate(halves):
        fit = Combination(signals, combiner, with_step).fit(half)
        threshold = calibrate(list(fit.episodes([e for e in halves[1 - h] if e.success]).values()), alpha)
        judged = fit.episodes([e for e in measured if calibration_half(e.cluster, split) == bool(h)])
        scores.update({episode_id: part - threshold for episode_id, part in judged.items()})
    return scores


@dataclass(frozen=True)
class AgainstCombination:
    """The combination against one signal on the same episodes (reference: the signal, arm: the combination)."""

    signal: str
    in_time: PairedComparison  # failures with a point of no return: flagged at or before it
    false_alarms: PairedComparison  # successes: the alarm fired
    in_time_by_state: ClusteredComparison  # the same, initial states as the unit
    false_alarms_by_state: ClusteredComparison
    # the signal's failures flagged in time with its threshold moved to as many false alarms as the combination
    # raised on these successes: how much of a gain is only a larger false-alarm budget
    in_time_at_matched_false_alarms: int

    def row(self) -> list[str]:
        def paired(c: PairedComparison, by_state: ClusteredComparison) -> list[str]:
            return [f"{c.reference_successes}/{c.n} -> {c.arm_successes}/{c.n}", *by_state.cells(),
                    f"{c.mcnemar_p:.3f}"]

        return [self.signal, *paired(self.in_time, self.in_time_by_state),
                f"{self.in_time_at_matched_false_alarms}/{self.in_time.n}",
                *paired(self.false_alarms, self.false_alarms_by_state)]


def in_time_at(scores: dict[str, np.ndarray], false_alarms: int, successes: Sequence[ScoredEpisode],
               timed: Sequence[ScoredEpisode]) -> int:
    """Failures an alarm reading ``scores`` (by episode id) flags at or before their point of no return with the
    threshold that gives ``false_alarms`` false alarms on ``successes`` (set on the measured episodes themselves,
    for a comparison at an equal false-alarm count, not as a usable threshold)."""
    maxima = np.sort([scores[e.episode_id].max() for e in successes])[::-1]
    if false_alarms >= len(maxima):
        threshold = -np.inf
    else:  # between the false_alarms-th largest success maximum and the next
        threshold = maxima[false_alarms] if false_alarms == 0 else (maxima[false_alarms - 1] + maxima[false_alarms]) / 2
    alarms = [first_alarm(scores[e.episode_id], threshold) for e in timed]
    return sum(a is not None and a <= e.point_of_no_return for a, e in zip(alarms, timed, strict=True))


def against_combination(reports: Sequence[SignalReport],
                        episodes: Sequence[ScoredEpisode]) -> list[AgainstCombination]:
    """Each single signal's alarms paired with the combination's, on the episodes ``reports`` measured."""
    combined = next((r for r in reports if r.signal == COMBINED), None)
    if combined is None:
        return []
    timed = [e for e in episodes if not e.success and e.point_of_no_return is not None]
    successes = [e for e in episodes if e.success]

    def in_time(alarms: dict[str, int | None], e: ScoredEpisode) -> bool:
        alarm = alarms[e.episode_id]
        return alarm is not None and alarm <= e.point_of_no_return

    def fired(alarms: dict[str, int | None]) -> list[bool]:
        return [alarms[e.episode_id] is not None for e in successes]

    rows = []
    for r in reports:
        if r.signal == COMBINED or not timed or not successes:
            continue
        flagged = ([in_time(r.alarms, e) for e in timed], [in_time(combined.alarms, e) for e in timed])
        false = (fired(r.alarms), fired(combined.alarms))
        rows.append(AgainstCombination(
            r.signal, compare_paired(*flagged), compare_paired(*false),
            compare_paired_clustered(*flagged, [e.cluster for e in timed]),
            compare_paired_clustered(*false, [e.cluster for e in successes]),
            in_time_at(r.judged, sum(false[1]), successes, timed)))
    return rows


def against_combination_table(rows: Sequence[AgainstCombination]) -> str:
    header = ["signal", "before point of no return: signal -> combined", "Δ [95% CI, by initial state]",
              "p (by initial state)", "McNemar p (by episode)", "signal at the combination's false alarms",
              "false alarms: signal -> combined",
              "Δ [95% CI, by initial state]", "p (by initial state)", "McNemar p (by episode)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(r.row()) + " |" for r in rows])


def splits_table(splits: Sequence[Sequence[AgainstCombination]]) -> str:
    """The combination against each signal on each draw of the folds (``splits[s]``: split s's pairs), and each
    signal's mean difference over the draws: a gain that holds on one draw only is the draw's."""
    header = ["split", "signal", "before point of no return: signal -> combined", "Δ [95% CI, by initial state]", "p",
              "signal at the combination's false alarms", "false alarms: signal -> combined"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for split, rows in enumerate(splits):
        if not rows:
            lines.append(f"| {split} | | no combination: a half of a fold lacks failures or successes | | | | |")
        for r in rows:
            c = r.in_time_by_state
            lines.append(f"| {split} | {r.signal} | {r.in_time.reference_successes} -> {r.in_time.arm_successes} "
                         f"of {r.in_time.n} | {' | '.join(c.cells())} | "
                         f"{r.in_time_at_matched_false_alarms} | {r.false_alarms.reference_successes} -> "
                         f"{r.false_alarms.arm_successes} of {r.false_alarms.n} |")
    for signal in dict.fromkeys(r.signal for rows in splits for r in rows):
        mine = [r for rows in splits for r in rows if r.signal == signal]
        gains = [r.in_time_by_state.difference for r in mine]
        better = sum(r.in_time_by_state.difference > 0 and r.in_time_by_state.p < 0.05 for r in mine)
        worse = sum(r.in_time_by_state.difference < 0 and r.in_time_by_state.p < 0.05 for r in mine)
        lines.append(f"| mean of {len(mine)} | {signal} | | {np.mean(gains):+.3f} (from {min(gains):+.3f} to "
                     f"{max(gains):+.3f}) | combined better on {better}, worse on {worse} (p < 0.05) | | |")
    return "\n".join(lines)


def markdown_table(reports: Sequence[SignalReport], alpha: float) -> str:
    header = ["signal", *(f"AUROC @{int(100 * f)}%" for f in FRACTIONS), f"false alarms (α={alpha})",
              "failures flagged", "flagged before point of no return", "failures with one", "median lead (steps)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.row()) + " |" for r in reports]
    return "\n".join(lines)
