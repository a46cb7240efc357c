"""The statistics of the result tables: mean and Student-t interval over seeds, the paired
difference of two rows over their shared seeds (interval, t-test, minimum detectable
effect), Welch's test when no seeds are shared, and the multiplicity corrections applied to
all the tests of one page together (Holm's step-down and Benjamini-Hochberg's step-up).

Runs with the same seed share data order, timesteps and candidate noises, so pairing by
seed removes the spread between seeds. The minimum detectable effect (MDE) is the smallest
true difference that n seeds with the observed spread of the differences would detect with
80% power at p < 0.05: a difference below it that is not significant is "not detectable
with these seeds", not "no effect".
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

ALPHA = 0.05
POWER = 0.8


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided Student-t interval); the width is nan for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = statistics.fmean(values)
    if n < 2:
        return mean, math.nan
    from scipy import stats

    sd = statistics.stdev(values)  # exact arithmetic: identical values give exactly 0
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def p_value(reference: dict[int, float], other: dict[int, float]) -> float | None:
    """Two-sided p-value of a difference in means: paired over shared seeds when there are
    at least two, else Welch's test; None when either side has fewer than two values."""
    from scipy import stats

    shared = sorted(reference.keys() & other.keys())
    if len(shared) >= 2:
        return paired_difference(reference, other).p  # type: ignore[union-attr]
    if len(reference) >= 2 and len(other) >= 2:
        return float(stats.ttest_ind(list(reference.values()), list(other.values()), equal_var=False).pvalue)
    return None


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference a two-sided paired t-test over ``n`` pairs, whose
    differences have standard deviation ``sd``, detects with probability ``power`` at level
    ``alpha``: the noncentral-t power function solved for its noncentrality, times sd/sqrt(n)."""
    if n < 2:
        return math.nan
    if sd == 0:
        return 0.0
    from scipy import optimize, stats

    df = n - 1
    crit = float(stats.t.ppf(1 - alpha / 2, df))

    def shortfall(nc: float) -> float:
        # P(T > crit) + P(T < -crit); the lower tail as sf(crit; -nc), which stays finite
        return float(stats.nct.sf(crit, df, nc) + stats.nct.sf(crit, df, -nc)) - power

    hi = 1.0
    while shortfall(hi) < 0:
        hi *= 2
    nc = optimize.brentq(shortfall, 0.0, hi, xtol=1e-12, rtol=1e-12)
    return nc * sd / math.sqrt(n)


@dataclass
class PairedDifference:
    """``other - reference`` over the shared seeds."""

    n: int
    mean: float
    low: float  # 95% interval of the mean difference
    high: float
    p: float  # paired t-test, two-sided
    mde: float  # minimum detectable effect at 80% power (same units as the metric)
    reference_mean: float  # over the shared seeds


def paired_difference(reference: dict[int, float], other: dict[int, float],
                      alpha: float = ALPHA, power: float = POWER) -> PairedDifference | None:
    """Mean, interval, p-value and detectable effect of ``other - reference`` over the seeds
    both share; None with fewer than two."""
    from scipy import stats

    shared = sorted(reference.keys() & other.keys())
    n = len(shared)
    if n < 2:
        return None
    diffs = [other[s] - reference[s] for s in shared]
    mean = statistics.fmean(diffs)
    sd = statistics.stdev(diffs)
    ref_mean = statistics.fmean(reference[s] for s in shared)
    if sd == 0:  # identical differences: no spread to test against
        return PairedDifference(n, mean, mean, mean, 1.0 if mean == 0 else 0.0, 0.0, ref_mean)
    result = stats.ttest_1samp(diffs, 0.0)
    ci = result.confidence_interval(1 - alpha)
    return PairedDifference(n, mean, float(ci.low), float(ci.high), float(result.pvalue),
                            minimum_detectable_effect(sd, n, alpha, power), ref_mean)


def welch_difference(reference: dict[int, float], other: dict[int, float],
                     alpha: float = ALPHA) -> tuple[float, float, float] | None:
    """(mean difference ``other - reference``, its interval) from Welch's t, ignoring the
    seeds (for rows without shared ones); None when either side has fewer than two values."""
    if len(reference) < 2 or len(other) < 2:
        return None
    from scipy import stats

    ci = stats.ttest_ind(list(other.values()), list(reference.values()), equal_var=False).confidence_interval(1 - alpha)
    return statistics.fmean(other.values()) - statistics.fmean(reference.values()), float(ci.low), float(ci.high)


# --------------------------------------------------------------------- multiplicity
def _checked(pvalues: Sequence[float]) -> list[float]:
    p = [float(x) for x in pvalues]
    bad = [x for x in p if not 0.0 <= x <= 1.0]  # also catches NaN
    if bad:
        raise ValueError(f"p-values must lie in [0, 1], got {bad[0]}")
    return p


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values, in the order given: the i-th smallest (from 0)
    times ``m - i``, made non-decreasing in that order and capped at 1. Rejecting where the
    adjusted value is below alpha controls the family-wise error rate at alpha."""
    p = _checked(pvalues)
    m = len(p)
    adjusted = [0.0] * m
    running = 0.0
    for i, k in enumerate(sorted(range(m), key=p.__getitem__)):
        running = max(running, min(1.0, (m - i) * p[k]))
        adjusted[k] = running
    return adjusted


def benjamini_hochberg(pvalues: Sequence[float]) -> list[float]:
    """Benjamini-Hochberg step-up adjusted p-values (q-values), in the order given: the i-th
    smallest (from 1) times ``m / i``, made non-decreasing from the largest down and capped
    at 1. Rejecting where it is below q controls the false discovery rate at q (independent
    or positively dependent tests)."""
    p = _checked(pvalues)
    m = len(p)
    adjusted = [0.0] * m
    running = 1.0
    for i, k in reversed(list(enumerate(sorted(range(m), key=p.__getitem__), start=1))):
        running = min(running, p[k] * m / i)
        adjusted[k] = running
    return adjusted
