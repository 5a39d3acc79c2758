"""Statistics for comparing sampler arms evaluated on the same initial states.

Why paired statistics: every arm of an evaluation runs the same seeded initial configurations with the same
sampling noise, so the episodes of two arms pair up one to one. Re-drawing only the sampling noise moves a
50-episode success rate by several points and flips many episodes, so two unpaired rates a few points apart say
little. Pairing removes the shared episode-to-episode variation: only the discordant pairs (one arm succeeds, the
other fails) carry information about the difference, which is what the exact McNemar test and the paired
bootstrap look at.

Everything here is a pure function of success flags; the computations are delegated to :mod:`scipy.stats`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a success rate of ``successes`` out of ``n``.

    Why Wilson: unlike the normal (Wald) interval it stays inside [0, 1] and keeps close to nominal coverage at
    the rates near 0 or 1 and the few-hundred-episode sample sizes of a policy evaluation.
    """
    if n <= 0:
        raise ValueError(f"wilson_interval needs at least one episode, got n={n}")
    if not 0 <= successes <= n:
        raise ValueError(f"successes must lie in [0, n={n}], got {successes}")
    _check_confidence(confidence)
    ci = stats.binomtest(int(successes), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pair counts.

    ``only_a`` counts pairs where arm A succeeded and arm B failed, ``only_b`` the reverse. Why exact: the
    discordant counts of an evaluation are small (tens), where the chi-squared approximation is poor; under the
    null hypothesis of equal success rates each discordant pair is a fair coin flip, so the p-value is a
    binomial test of ``only_a`` out of ``only_a + only_b`` at p = 0.5. With no discordant pairs the arms do not
    differ on any episode and the p-value is 1.
    """
    if only_a < 0 or only_b < 0:
        raise ValueError(f"discordant counts must be non-negative, got {only_a} and {only_b}")
    total = only_a + only_b
    if total == 0:
        return 1.0
    return float(stats.binomtest(int(only_a), int(total), p=0.5, alternative="two-sided").pvalue)


def paired_bootstrap_diff(
    a: Sequence[bool],
    b: Sequence[bool],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
    method: str = "percentile",
) -> tuple[float, float, float]:
    """Success-rate difference ``mean(b) - mean(a)`` with a paired bootstrap confidence interval.

    Returns ``(difference, low, high)``. Episodes are resampled as pairs (the i-th episode of ``a`` always stays
    with the i-th of ``b``), so the interval reflects only the discordant pairs, not the shared difficulty of the
    initial states. The generator is seeded, so the same inputs always give the same interval. Why percentile by
    default: the data are binary with many ties, where BCa's acceleration estimate can be undefined; pass
    ``method="BCa"`` to use it anyway. When every pair has the same difference (e.g. identical arms) the
    bootstrap distribution is a single point and that point is returned as the interval.
    """
    x = _as_flags(a, "a")
    y = _as_flags(b, "b")
    if x.shape != y.shape:
        raise ValueError(f"paired samples must have the same length, got {x.size} and {y.size}")
    if x.size == 0:
        raise ValueError("paired_bootstrap_diff needs at least one pair")
    _check_confidence(confidence)
    if resamples < 1:
        raise ValueError(f"resamples must be positive, got {resamples}")
    diff = y.astype(float) - x.astype(float)
    observed = float(diff.mean())
    if np.all(diff == diff[0]):
        return observed, observed, observed

    def mean_difference(first: np.ndarray, second: np.ndarray, axis: int = -1) -> np.ndarray:
        return np.mean(second, axis=axis) - np.mean(first, axis=axis)

    result = stats.bootstrap(
        (x.astype(float), y.astype(float)),
        mean_difference,
        paired=True,
        vectorized=True,
        confidence_level=confidence,
        n_resamples=resamples,
        method=method,
        rng=np.random.default_rng(seed),
    )
    ci = result.confidence_interval
    return observed, float(ci.low), float(ci.high)


@dataclass(frozen=True)
class PairedComparison:
    """An arm against the reference arm on the same ``n`` paired episodes.

    ``difference`` is ``arm_rate - reference_rate``; ``only_reference`` counts episodes the reference solved and
    the arm did not, ``only_arm`` the reverse. ``diff_low``/``diff_high`` are the paired bootstrap interval of the
    difference at ``confidence``.
    """

    n: int
    reference_successes: int
    arm_successes: int
    reference_rate: float
    arm_rate: float
    difference: float
    only_reference: int
    only_arm: int
    mcnemar_p: float
    diff_low: float
    diff_high: float
    confidence: float

    def cells(self) -> list[str]:
        """The difference with its interval, and McNemar's p, as a table's two cells."""
        return _cells(self.difference, self.diff_low, self.diff_high, self.mcnemar_p)


def compare_paired(
    reference: Sequence[bool],
    arm: Sequence[bool],
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedComparison:
    """Compare ``arm`` against ``reference``, whose i-th entries come from the same initial state and noise."""
    ref = _as_flags(reference, "reference")
    other = _as_flags(arm, "arm")
    if ref.shape != other.shape:
        raise ValueError(f"paired samples must have the same length, got {ref.size} and {other.size}")
    if ref.size == 0:
        raise ValueError("compare_paired needs at least one pair")
    only_reference = int(np.sum(ref & ~other))
    only_arm = int(np.sum(~ref & other))
    difference, low, high = paired_bootstrap_diff(ref, other, confidence, resamples, seed)
    return PairedComparison(
        n=int(ref.size),
        reference_successes=int(ref.sum()),
        arm_successes=int(other.sum()),
        reference_rate=float(ref.mean()),
        arm_rate=float(other.mean()),
        difference=difference,
        only_reference=only_reference,
        only_arm=only_arm,
        mcnemar_p=mcnemar_exact(only_reference, only_arm),
        diff_low=low,
        diff_high=high,
        confidence=confidence,
    )


@dataclass(frozen=True)
class ClusteredComparison:
    """An arm against the reference on ``n`` paired episodes that come in ``clusters`` (e.g. several noise draws of
    one initial state): ``difference`` is ``arm_rate - reference_rate`` over the episodes, its interval and ``p``
    come from the clusters."""

    n: int
    clusters: int
    difference: float
    diff_low: float
    diff_high: float
    p: float  # two-sided sign-flip permutation test of the clusters' summed differences
    confidence: float

    def cells(self) -> list[str]:
        return _cells(self.difference, self.diff_low, self.diff_high, self.p)


def compare_paired_clustered(reference: Sequence[bool], arm: Sequence[bool], clusters: Sequence[object],
                             confidence: float = 0.95, resamples: int = 10_000, seed: int = 0
                             ) -> ClusteredComparison:
    """``compare_paired`` for pairs that are not independent: episodes of one cluster share what decides them (an
    initial state rolled out with fresh noise fails or succeeds together more often than two states do), so
    McNemar's test and an episode bootstrap count them as more evidence than they are. Here the cluster is the
    unit: the interval resamples whole clusters (the ratio of summed differences to summed sizes) and the test
    flips the sign of each cluster's summed difference (no difference: either arm's flags are as likely in each
    cluster). With one episode per cluster this is the paired permutation test."""
    ref = _as_flags(reference, "reference").astype(float)
    other = _as_flags(arm, "arm").astype(float)
    if ref.shape != other.shape or ref.shape != (len(clusters),):
        raise ValueError(f"paired samples and their clusters must have the same length, got {ref.size}, "
                         f"{other.size} and {len(clusters)}")
    if ref.size == 0:
        raise ValueError("compare_paired_clustered needs at least one pair")
    _check_confidence(confidence)
    _, member = np.unique(np.asarray([str(c) for c in clusters]), return_inverse=True)
    summed = np.bincount(member, weights=other - ref)
    sizes = np.bincount(member).astype(float)
    observed = float(summed.sum() / sizes.sum())
    if np.all(summed == 0) or summed.size == 1:
        low = high = observed
        p = 1.0 if observed == 0 else float(2.0 ** (1 - summed.size))
    else:
        def ratio(d: np.ndarray, m: np.ndarray, axis: int = -1) -> np.ndarray:
            return d.sum(axis=axis) / m.sum(axis=axis)

        ci = stats.bootstrap((summed, sizes), ratio, paired=True, vectorized=True, confidence_level=confidence,
                             n_resamples=resamples, method="percentile",
                             rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
        p = float(stats.permutation_test((summed,), np.sum, permutation_type="samples", n_resamples=resamples,
                                         vectorized=True, rng=np.random.default_rng(seed)).pvalue)
    return ClusteredComparison(int(ref.size), int(summed.size), observed, low, high, p, confidence)


@dataclass(frozen=True)
class PooledComparison:
    """An arm re-trained with several seeds against one reference, on the same ``n`` episodes: ``difference`` is
    the mean over episodes of the arm's success rate over seeds minus the reference's success."""

    n: int
    seeds: int
    reference_rate: float
    arm_rate: float
    difference: float
    diff_low: float
    diff_high: float
    p: float  # two-sided sign-flip permutation test of the per-episode differences
    confidence: float


def compare_paired_over_seeds(reference: Sequence[bool] | Sequence[Sequence[bool]], arms: Sequence[Sequence[bool]],
                              confidence: float = 0.95, resamples: int = 10_000, seed: int = 0) -> PooledComparison:
    """One arm trained with each of several seeds (``arms[s]``) against a reference on the same episodes: one
    reference for every seed (success only), or one per seed (``reference[s]``, e.g. that seed's paper rule).

    Why not pool the pairs: the seeds share the episodes (and a shared reference's outcomes), so their pairs are
    not independent. Each episode instead contributes one number, its mean over seeds of arm minus reference, and
    the episodes are the unit of resampling (bootstrap interval) and of the test (sign flips under "no
    difference")."""
    ref = np.asarray(reference)
    runs = np.stack([_as_flags(a, "arm") for a in arms]).astype(float) if len(arms) else np.empty((0, ref.size))
    refs = np.stack([_as_flags(r, "reference") for r in ref]).astype(float) if ref.ndim == 2 else \
        np.broadcast_to(_as_flags(ref, "reference").astype(float), runs.shape)
    if runs.shape[0] == 0 or runs.shape != refs.shape or runs.shape[1] == 0:
        raise ValueError(f"compare_paired_over_seeds needs at least one seed's paired episodes, got arms "
                         f"{list(runs.shape)} and reference {list(ref.shape)}")
    _check_confidence(confidence)
    diff = (runs - refs).mean(axis=0)
    observed = float(diff.mean())
    if np.all(diff == diff[0]):
        low = high = observed
        p = 1.0 if observed == 0 else float(2.0 ** (1 - diff.size))
    else:
        ci = stats.bootstrap((diff,), np.mean, confidence_level=confidence, n_resamples=resamples,
                             method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
        p = float(stats.permutation_test((diff,), np.mean, permutation_type="samples", n_resamples=resamples,
                                         rng=np.random.default_rng(seed)).pvalue)
    return PooledComparison(int(diff.size), int(runs.shape[0]), float(refs.mean()), float(runs.mean()), observed,
                            low, high, p, confidence)


def _cells(difference: float, low: float, high: float, p: float) -> list[str]:
    """A difference with its interval, and its p-value, as a table's two cells."""
    return [f"{difference:+.3f} [{low:+.3f}, {high:+.3f}]", f"{p:.3f}"]


def _as_flags(values: Sequence[bool], name: str) -> np.ndarray:
    flags = np.asarray(values)
    if flags.ndim != 1:
        raise ValueError(f"{name} must be a flat sequence of success flags, got shape {flags.shape}")
    if flags.size and not np.all((flags == 0) | (flags == 1)):
        raise ValueError(f"{name} must contain only success flags (True/False or 0/1)")
    return flags.astype(bool)


def _check_confidence(confidence: float) -> None:
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must lie strictly between 0 and 1, got {confidence}")
