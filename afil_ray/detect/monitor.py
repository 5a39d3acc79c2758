"""The live failure monitor: what a rollout calls at every re-planning step (``ChunkedRollout(monitor=...)``).

It scores the states, and the chunks sampled there before they run, with the policy's failure signals
(``afil_ray/detect/signals.py``), one signal or their fitted combination (``afil_ray/detect/alarm.py``), and says
which exceed the alarm's calibrated threshold; the rollout keeps each episode's scores in its
``extra["failure_scores"]`` ([step, score] pairs), so every stored episode carries the alarm's view of it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from afil_ray.detect.alarm import Combination
from afil_ray.detect.signals import FailureSignals


class FailureMonitor:
    def __init__(self, signals: FailureSignals, threshold: float, combination: Combination | None = None) -> None:
        if combination is None and len(signals.signals) != 1:
            raise ValueError(f"monitoring {len(signals.signals)} signals needs their fitted combination")
        if combination is not None and set(combination.signals) != set(signals.signals):
            raise ValueError(f"the combination reads {list(combination.signals)}, the signals are "
                             f"{list(signals.signals)}")
        self.signals, self.threshold, self.combination = signals, float(threshold), combination

    def __call__(self, obs: Mapping[str, np.ndarray], instructions: Sequence[str],
                 chunks: np.ndarray | None = None) -> np.ndarray:
        """The failure score [B] of each state and the chunk [B, H, A] the policy sampled for it (higher: more
        likely to fail)."""
        scores = self.signals(obs, instructions, chunks)
        if self.combination is not None:
            return self.combination.rows(scores)
        return scores[self.signals.signals[0]]

    def alarms(self, scores: np.ndarray) -> np.ndarray:
        """Which scores raise the alarm."""
        return np.asarray(scores) > self.threshold
