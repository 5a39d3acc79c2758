"""Statistics of the paired evaluation protocol, checked against closed forms and published values."""

from __future__ import annotations

import math

import numpy as np
import pytest

from afil_ray.eval.stats import (
    PairedComparison,
    compare_paired,
    mcnemar_exact,
    paired_bootstrap_diff,
    wilson_interval,
)

Z95 = 1.959963984540054  # the 97.5% quantile of the standard normal distribution


def wilson_closed_form(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson (1927) score interval written out: (p + z²/2n ± z·sqrt(p(1-p)/n + z²/4n²)) / (1 + z²/n)."""
    p = k / n
    denominator = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return centre - half, centre + half


def exact_mcnemar_closed_form(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(b, c) + 1)) / 2**n
    return min(1.0, 2 * tail)


@pytest.mark.parametrize(
    ("k", "n", "expected"),
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (45, 50, (0.7864, 0.9565)),
        (10, 10, (0.7225, 1.0)),
    ],
)
def test_wilson_matches_published_values(k: int, n: int, expected: tuple[float, float]) -> None:
    assert wilson_closed_form(k, n) == pytest.approx(expected, abs=1e-4)
    assert wilson_interval(k, n) == pytest.approx(expected, abs=1e-4)


def test_wilson_matches_closed_form_over_a_grid() -> None:
    for n in (1, 2, 3, 7, 20, 50, 150, 1000):
        for k in sorted({0, 1, n // 3, n // 2, n - 1, n}):
            low, high = wilson_interval(k, n)
            assert (low, high) == pytest.approx(wilson_closed_form(k, n), abs=1e-9), (k, n)
            assert 0.0 <= low <= k / n <= high <= 1.0


def test_wilson_other_confidence_levels() -> None:
    z90 = 1.6448536269514722
    assert wilson_interval(30, 150, confidence=0.90) == pytest.approx(wilson_closed_form(30, 150, z90), abs=1e-9)
    narrow, wide = wilson_interval(30, 150, 0.80), wilson_interval(30, 150, 0.99)
    assert wide[0] < narrow[0] < narrow[1] < wide[1]


@pytest.mark.parametrize(("k", "n"), [(0, 0), (3, 2), (-1, 5)])
def test_wilson_rejects_impossible_counts(k: int, n: int) -> None:
    with pytest.raises(ValueError):
        wilson_interval(k, n)


def test_mcnemar_known_cases() -> None:
    assert mcnemar_exact(0, 6) == pytest.approx(2 * 0.5**6)
    assert mcnemar_exact(0, 6) == pytest.approx(0.03125)
    assert mcnemar_exact(3, 3) == 1.0
    assert mcnemar_exact(0, 0) == 1.0
    assert mcnemar_exact(2, 9) == pytest.approx(134 / 2048)  # 2·(C(11,0)+C(11,1)+C(11,2))/2^11
    assert mcnemar_exact(0, 1) == 1.0


def test_mcnemar_is_symmetric_and_matches_the_binomial_tail() -> None:
    for b in range(0, 25, 3):
        for c in range(0, 25, 4):
            assert mcnemar_exact(b, c) == pytest.approx(mcnemar_exact(c, b), rel=1e-12)
            assert mcnemar_exact(b, c) == pytest.approx(exact_mcnemar_closed_form(b, c), rel=1e-9), (b, c)


def test_mcnemar_rejects_negative_counts() -> None:
    with pytest.raises(ValueError):
        mcnemar_exact(-1, 3)


def correlated_pair(n: int = 150, successes: int = 100, lost: int = 5, gained: int = 15) -> tuple[np.ndarray, ...]:
    """Reference and arm agreeing on all but ``lost + gained`` episodes, in a shuffled order."""
    reference = np.arange(n) < successes
    arm = reference.copy()
    arm[:lost] = False  # the reference solved these, the arm did not
    arm[successes : successes + gained] = True  # the reverse
    order = np.random.default_rng(7).permutation(n)
    return reference[order], arm[order]


def test_bootstrap_is_deterministic_for_a_seed_and_contains_the_difference() -> None:
    reference, arm = correlated_pair()
    first = paired_bootstrap_diff(reference, arm, seed=3)
    assert first == paired_bootstrap_diff(reference, arm, seed=3)
    difference, low, high = first
    assert difference == pytest.approx(10 / 150)
    assert low < difference < high


def test_bootstrap_interval_is_the_paired_one() -> None:
    # The paired standard error depends only on the discordant pairs; resampling the arms independently would
    # give an interval almost twice as wide here (reference and arm agree on 130 of 150 episodes).
    n, lost, gained = 150, 5, 15
    reference, arm = correlated_pair(n, 100, lost, gained)
    difference, low, high = paired_bootstrap_diff(reference, arm, resamples=20_000)
    se_paired = math.sqrt(((lost + gained) / n - difference**2) / n)
    assert (high - low) / 2 == pytest.approx(Z95 * se_paired, abs=0.012)
    p1, p2 = reference.mean(), arm.mean()
    se_unpaired = math.sqrt(p1 * (1 - p1) / n + p2 * (1 - p2) / n)
    assert (high - low) / 2 < 0.75 * Z95 * se_unpaired


def test_bootstrap_of_identical_arms_is_a_point_at_zero() -> None:
    flags = [True, False, True, True, False] * 10
    assert paired_bootstrap_diff(flags, list(flags)) == (0.0, 0.0, 0.0)


def test_bootstrap_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="same length"):
        paired_bootstrap_diff([True, False], [True])
    with pytest.raises(ValueError):
        paired_bootstrap_diff([], [])


def test_compare_paired_counts_the_discordant_pairs() -> None:
    reference, arm = correlated_pair()
    comparison = compare_paired(reference, arm)
    assert isinstance(comparison, PairedComparison)
    assert comparison.n == 150
    assert (comparison.reference_successes, comparison.arm_successes) == (100, 110)
    assert comparison.reference_rate == pytest.approx(100 / 150)
    assert comparison.arm_rate == pytest.approx(110 / 150)
    assert comparison.difference == pytest.approx(10 / 150)
    assert (comparison.only_reference, comparison.only_arm) == (5, 15)
    assert comparison.mcnemar_p == pytest.approx(exact_mcnemar_closed_form(5, 15))
    assert comparison.diff_low < comparison.difference < comparison.diff_high
    assert comparison.confidence == 0.95


def test_compare_paired_rejects_unpaired_input() -> None:
    with pytest.raises(ValueError, match="same length"):
        compare_paired([True, True, False], [True, False])
    with pytest.raises(ValueError, match="success flags"):
        compare_paired([0, 1, 2], [0, 1, 1])


def test_the_comparison_over_seeds_counts_each_episode_once() -> None:
    from afil_ray.eval.stats import compare_paired_over_seeds

    reference = [True] * 10 + [False] * 10
    same = compare_paired_over_seeds(reference, [reference, reference])
    assert (same.difference, same.p) == (0.0, 1.0)
    # one seed gains the ten failures, the other nothing: +0.25 on average, every gain on the same ten episodes
    half = compare_paired_over_seeds(reference, [[True] * 20, reference])
    assert half.difference == pytest.approx(0.25) and half.seeds == 2 and half.arm_rate == pytest.approx(0.75)
    assert half.diff_low > 0 and half.p < 0.01
    # seeds that disagree in sign cancel out
    mixed = compare_paired_over_seeds(reference, [[True] * 20, [False] * 20])
    assert mixed.difference == pytest.approx(0.0) and mixed.p > 0.5
    # a reference per seed: each seed's arm against its own
    own = compare_paired_over_seeds([reference, [False] * 20], [[True] * 20, [False] * 20])
    assert own.difference == pytest.approx(0.25) and own.reference_rate == pytest.approx(0.25)
    with pytest.raises(ValueError, match="needs at least one seed"):
        compare_paired_over_seeds(reference, [])


def test_copies_of_one_initial_state_add_no_evidence_when_clustered() -> None:
    """Rolling every initial state out three times with the same outcome triples the pairs: McNemar's p falls, as
    if there were three times the evidence; by initial state the difference, interval and p stay where they were."""
    from afil_ray.eval.stats import compare_paired_clustered

    reference, arm = correlated_pair()
    states = list(range(len(reference)))
    once = compare_paired_clustered(reference, arm, states)
    thrice = compare_paired_clustered(np.tile(reference, 3), np.tile(arm, 3), states * 3)
    assert (once.n, once.clusters, thrice.n, thrice.clusters) == (150, 150, 450, 150)
    assert thrice.difference == pytest.approx(once.difference) == pytest.approx(10 / 150)
    assert (thrice.diff_low, thrice.diff_high, thrice.p) == pytest.approx((once.diff_low, once.diff_high, once.p))
    assert compare_paired(np.tile(reference, 3), np.tile(arm, 3)).mcnemar_p < once.p / 10
    # one pair per cluster: the sign-flip test agrees with McNemar's (5 against 15 discordant pairs)
    assert once.p == pytest.approx(exact_mcnemar_closed_form(5, 15), abs=0.01)
    same = compare_paired_clustered(reference, reference, states)
    assert (same.difference, same.diff_low, same.diff_high, same.p) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="same length"):
        compare_paired_clustered(reference, arm, states[:-1])
