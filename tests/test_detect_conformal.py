"""The calibrated alarm's false-alarm rate on synthetic scores: at most alpha on fresh successes, and close to it
(not a threshold so high it never fires); too few calibration episodes give no alarm rather than a broken promise."""

from __future__ import annotations

import math

import numpy as np
import pytest

from afil_ray.detect.conformal import calibrate, first_alarm


def _episodes(rng: np.random.Generator, n: int, shift: float = 0.0) -> list[np.ndarray]:
    """Per-step scores of n episodes of random length: noise, plus ``shift`` from the middle on (a failure)."""
    out = []
    for _ in range(n):
        length = int(rng.integers(20, 60))
        s = rng.normal(0, 1, length)
        s[length // 2:] += shift
        out.append(s)
    return out


@pytest.mark.parametrize("alpha", [0.05, 0.2])
def test_false_alarms_on_fresh_successes_stay_at_alpha(alpha):
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(200):  # the guarantee is on average over calibration draws
        threshold = calibrate(_episodes(rng, 100), alpha)
        fresh = _episodes(rng, 200)
        rates.append(np.mean([first_alarm(s, threshold) is not None for s in fresh]))
    mean = float(np.mean(rates))
    assert alpha - 0.02 <= mean <= alpha + 1 / 101 + 0.005, mean


def test_failures_are_flagged_after_their_shift_and_few_calibration_episodes_never_alarm():
    rng = np.random.default_rng(1)
    threshold = calibrate(_episodes(rng, 400), 0.05)
    failures = _episodes(rng, 200, shift=4.0)
    steps = [first_alarm(s, threshold) for s in failures]
    assert np.mean([s is not None for s in steps]) > 0.95
    assert np.mean([s is not None and s >= len(f) // 2 for s, f in zip(steps, failures, strict=True)]) > 0.8
    assert calibrate(_episodes(rng, 10), 0.05) == math.inf  # 10 episodes cannot promise 5%
    assert first_alarm(np.array([0.1, 0.2]), math.inf) is None
    with pytest.raises(ValueError, match="alpha"):
        calibrate(_episodes(rng, 10), 0.0)


def test_a_time_band_standardises_each_score_by_the_successes_at_its_step():
    from afil_ray.detect.conformal import TimeBand

    rng = np.random.default_rng(0)
    steps = np.arange(0, 40, 8)  # re-planning steps
    successes = [(steps, 5.0 - steps / 8 + rng.normal(0, 0.5, len(steps))) for _ in range(60)]
    band = TimeBand.fit(successes[:30], successes[30:], alpha=0.1)
    np.testing.assert_array_equal(band.steps, steps)
    np.testing.assert_allclose(band.centre, 5.0 - steps / 8, atol=0.4)
    assert np.isfinite(band.height) and band.height > 0
    # a score of 3 is ordinary at step 16 and alarming at step 32; a step past the successes' reach (48) is
    # judged like the last one they reached, and one between re-planning steps like the step before it
    z = band.standardise(np.array([16, 32, 48, 20]), np.array([3.0, 3.0, 3.0, 3.0]))
    assert abs(z[0]) < 1.0 and z[1] > band.height and z[2] == z[1] and z[3] == z[0]
    # too few successes at a step: it borrows; none at all: no band, no alarm
    late = [(np.array([0, 8, 16]), np.zeros(3))] * 2 + [(np.array([0, 8]), np.zeros(2))] * 10
    assert TimeBand.fit(late, late, alpha=0.1, min_count=5).steps.tolist() == [0, 8]
    empty = TimeBand.fit([], late, alpha=0.1)
    assert np.isinf(empty.height) and empty.standardise(np.array([0]), np.array([2.0])).tolist() == [2.0]
