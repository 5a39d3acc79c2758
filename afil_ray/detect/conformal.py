"""A calibrated alarm: the threshold on a per-step failure score that fires on at most a chosen share of successes.

Split conformal prediction on whole episodes (as FIPER and FAIL-Detect calibrate theirs): an alarm fires at the
first step whose score exceeds the threshold, so a successful episode raises a false alarm exactly when its
*largest* score does. With the largest scores of n successful calibration episodes, the threshold at the
⌈(n+1)(1−α)⌉-th smallest of them gives P(false alarm) ≤ α on a new successful episode drawn like them
(exchangeability), and no more than α + 1/(n+1) on average: tight, not just safe.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

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
