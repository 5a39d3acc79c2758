"""A calibrated alarm: the threshold on a per-step failure score that fires on at most a chosen share of successes.

Split conformal prediction on whole episodes (as FIPER and FAIL-Detect calibrate theirs): an alarm fires at the
first step whose score exceeds the threshold, so a successful episode raises a false alarm exactly when its
*largest* score does. With the largest scores of n successful calibration episodes, the threshold at the
⌈(n+1)(1−α)⌉-th smallest of them gives P(false alarm) ≤ α on a new successful episode drawn like them
(exchangeability), and no more than α + 1/(n+1) on average: tight, not just safe. ``TimeBand`` does the same
on scores standardised per step, so that the threshold can follow how successes score over time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np


def episode_maxima(scores: Sequence[np.ndarray]) -> np.ndarray:
    """Each episode's largest per-step score (what decides whether its alarm ever fires)."""
    return np.array([float(np.max(s)) for s in scores if len(s)], np.float64)


def calibrate(success_scores: Sequence[np.ndarray], alpha: float) -> float:
    """The threshold that false-alarms on at most ``alpha`` of successful episodes like ``success_scores`` (one
    array of per-step scores per episode); +inf when there are too few episodes to promise ``alpha``."""
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    maxima = np.sort(episode_maxima(success_scores))
    n = len(maxima)
    rank = math.ceil((n + 1) * (1.0 - alpha) - 1e-9)  # 10 * (1 - 0.1) is 9.000000000000002 in floating point
    if rank > n:  # fewer than 1/alpha - 1 episodes: only "never" keeps the promise
        return math.inf
    return float(maxima[rank - 1])


def first_alarm(scores: np.ndarray, threshold: float) -> int | None:
    """The first step whose score exceeds ``threshold``, or None when the alarm never fires."""
    above = np.flatnonzero(np.asarray(scores) > threshold)
    return int(above[0]) if len(above) else None


@dataclass(frozen=True)
class TimeBand:
    """A threshold that changes with the step (FAIL-Detect's time-varying band), calibrated on successes alone.

    A success's score is not the same at every step (the critic doubts at the start and is sure near the end), so a
    single threshold must clear every success's early doubt and fires late. Here each score is standardised by the
    centre and spread of successes' scores *at the same step* (one set of successes), and one conformal height on
    the standardised maxima of *other* successes holds the false-alarm rate: the alarm fires where a score is
    unusual for its step. Steps with fewer than ``min_count`` successes borrow the nearest earlier step's estimate
    (successes end early; a long-running episode is judged by the latest step successes still reached).
    """

    steps: np.ndarray  # [S] ascending steps with an estimate
    centre: np.ndarray  # [S] successes' mean score at each
    scale: np.ndarray  # [S] their standard deviation (floored)
    height: float  # the conformal threshold on standardised scores (+inf: too few successes to promise alpha)

    @classmethod
    def fit(cls, fit_on: Sequence[tuple[np.ndarray, np.ndarray]], calibrate_on: Sequence[tuple[np.ndarray, np.ndarray]],
            alpha: float, min_count: int = 5) -> TimeBand:
        """The band from successes' (steps, scores): per-step centre and spread from ``fit_on``, the height from
        ``calibrate_on``'s standardised maxima."""
        by_step: dict[int, list[float]] = {}
        for steps, scores in fit_on:
            for step, score in zip(np.asarray(steps), np.asarray(scores, np.float64), strict=True):
                by_step.setdefault(int(step), []).append(float(score))
        grid = np.array(sorted(s for s, v in by_step.items() if len(v) >= min_count), np.int64)
        if not len(grid):
            return cls(grid, np.zeros(0), np.ones(0), math.inf)
        centre = np.array([np.mean(by_step[s]) for s in grid])
        spread = np.array([np.std(by_step[s]) for s in grid])
        # a step where every success scored alike would turn any difference into an alarm: the floor is a tenth
        # of the spread over all steps
        floor = max(0.1 * float(np.std(np.concatenate([by_step[s] for s in grid]))), 1e-9)
        band = cls(grid, centre, np.maximum(spread, floor), math.inf)
        return replace(band, height=calibrate([band.standardise(steps, scores) for steps, scores in calibrate_on],
                                              alpha))

    def standardise(self, steps: np.ndarray, scores: np.ndarray) -> np.ndarray:
        """Each score less its step's centre, over its step's spread (an uncalibrated band: the scores as given)."""
        scores = np.asarray(scores, np.float64)
        if not len(self.steps):
            return scores
        at = np.clip(np.searchsorted(self.steps, np.asarray(steps), side="right") - 1, 0, len(self.steps) - 1)
        return (scores - self.centre[at]) / self.scale[at]
