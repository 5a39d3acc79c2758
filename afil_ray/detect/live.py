"""The alarm of a running loop: per-episode verdicts against a threshold calibrated on the worker's own recent
successes.

A study calibrates once on a fixed set of successful rollouts (afil_ray/detect/alarm.py); a loop's policy changes
with every weight version, and its scores with it, so the rollout worker keeps re-calibrating: the threshold for an
episode is the split-conformal one (afil_ray/detect/conformal.py) on the largest scores of the ``window`` successful
episodes that finished before it. Until there are enough of them to promise the false-alarm rate, no alarm fires.

A time-aware alarm (``time_aware``) judges each score against what successes scored at the same step
(``TimeBand``): every other success in the window estimates the per-step band, the rest set its height, so the
alarm need not wait until a failure's score clears every success's early doubt.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from afil_ray.detect.conformal import TimeBand, calibrate, first_alarm
from afil_ray.envs.collector import FAILURE_SCORES_KEY
from afil_ray.replay.episode import Episode

LIVE_ALARM_KEY = "live_alarm"  # extra key of an episode a calibrated live alarm judged: {"step": ..., "threshold": ...}


@dataclass(frozen=True)
class AlarmVerdict:
    """What the alarm said about one finished episode."""

    success: bool
    length: int
    max_score: float
    threshold: float  # the threshold in force for it (a time band's height on standardised scores; inf: not yet)
    alarm_step: int | None  # the first scored step above the threshold, None when it never fired

    @property
    def fired(self) -> bool:
        return self.alarm_step is not None

    @property
    def lead(self) -> int | None:
        """Steps between the alarm and the episode's end (how long a hand-over would have had)."""
        return None if self.alarm_step is None else self.length - self.alarm_step


def episode_scores(episode: Episode) -> tuple[np.ndarray, np.ndarray]:
    """(steps, scores) the monitor recorded for ``episode``; empty when it ran without one."""
    pairs = np.asarray(episode.extra.get(FAILURE_SCORES_KEY, []), np.float64).reshape(-1, 2)
    return pairs[:, 0].astype(np.int64), pairs[:, 1]


class LiveAlarm:
    """Calibrates on successes as they finish and judges every episode with the threshold before it."""

    def __init__(self, alpha: float, window: int, time_aware: bool = False) -> None:
        if window < 1:
            raise ValueError(f"the calibration window needs at least one episode, got {window}")
        self.alpha, self.time_aware = alpha, time_aware
        self.success_maxima: deque[float] = deque(maxlen=window)
        self.threshold = math.inf
        # time-aware: the window's successes alternate between estimating the band and setting its height
        self.band_successes = (deque(maxlen=(window + 1) // 2), deque(maxlen=max(window // 2, 1)))
        self.band = TimeBand(np.zeros(0, np.int64), np.zeros(0), np.ones(0), math.inf)
        self._successes = 0

    def observe(self, episode: Episode) -> AlarmVerdict | None:
        """The verdict on a finished episode (None when it carries no scores), then its scores join the
        calibration if it succeeded."""
        steps, scores = episode_scores(episode)
        if not len(scores):
            return None
        judged = self.band.standardise(steps, scores) if self.time_aware else scores
        alarm = first_alarm(judged, self.threshold)
        verdict = AlarmVerdict(bool(episode.success), episode.length, float(scores.max()), self.threshold,
                               None if alarm is None else int(steps[alarm]))
        if episode.success:
            self._learn(steps, scores)
        return verdict

    def _learn(self, steps: np.ndarray, scores: np.ndarray) -> None:
        if not self.time_aware:
            self.success_maxima.append(float(scores.max()))
            self.threshold = calibrate([np.array([m]) for m in self.success_maxima], self.alpha)
            return
        self.band_successes[self._successes % 2].append((steps, scores))
        self._successes += 1
        self.band = TimeBand.fit(*self.band_successes, alpha=self.alpha)
        self.threshold = self.band.height
