"""The statistics of the tables: paired differences, intervals, p-values and the minimum
detectable effect against scipy and statsmodels on fixed examples, and the multiplicity
corrections against statsmodels' ``multipletests``."""

from __future__ import annotations

import math
import random

import pytest
from scipy import stats

from noisevalue.experiments.paired import (
    benjamini_hochberg,
    holm,
    mean_ci,
    minimum_detectable_effect,
    paired_difference,
    welch_difference,
)

VANILLA = {0: 0.0821, 1: 0.0817, 2: 0.0830, 3: 0.0826, 4: 0.0819, 5: 0.0824}
RATER = {0: 0.0818, 1: 0.0819, 2: 0.0825, 3: 0.0821, 4: 0.0818, 5: 0.0820}


def test_paired_difference_matches_scipy():
    d = paired_difference(VANILLA, RATER)
    assert d is not None and d.n == 6
    a, b = [VANILLA[s] for s in range(6)], [RATER[s] for s in range(6)]
    ref = stats.ttest_rel(b, a)
    ci = ref.confidence_interval(0.95)
    assert d.p == pytest.approx(ref.pvalue, rel=1e-12)
    assert (d.low, d.high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    assert d.mean == pytest.approx(sum(b) / 6 - sum(a) / 6, rel=1e-12)
    assert d.reference_mean == pytest.approx(sum(a) / 6)


@pytest.mark.parametrize("n", [2, 3, 5, 20])
def test_minimum_detectable_effect_matches_statsmodels(n):
    from statsmodels.stats.power import TTestPower

    sd = 0.37
    effect = TTestPower().solve_power(effect_size=None, nobs=n, alpha=0.05, power=0.8, alternative="two-sided")
    assert minimum_detectable_effect(sd, n) == pytest.approx(effect * sd, rel=1e-6)
    # and the power at the MDE is 80% by statsmodels' own power function
    assert TTestPower().power(minimum_detectable_effect(1.0, n), nobs=n, alpha=0.05) == pytest.approx(0.8, abs=1e-8)


def test_the_detectable_effect_shrinks_like_one_over_root_n():
    # for large n the t distribution is normal: MDE ~ (z_0.975 + z_0.8) sd / sqrt(n)
    z = stats.norm.ppf(0.975) + stats.norm.ppf(0.8)
    assert minimum_detectable_effect(1.0, 2000) == pytest.approx(z / math.sqrt(2000), rel=2e-3)
    assert minimum_detectable_effect(2.0, 20) > minimum_detectable_effect(2.0, 80) * 1.9


def test_identical_differences_and_too_few_seeds():
    same = paired_difference({0: 1.0, 1: 2.0}, {0: 1.5, 1: 2.5})
    assert same is not None and same.mean == 0.5 and same.p == 0.0 and same.mde == 0.0
    assert paired_difference({0: 1.0}, {0: 2.0}) is None


def test_twenty_identical_starting_values_have_no_spread():
    # summing 0.08756 twenty times leaves a rounding residue; the table must print "± 0"
    assert mean_ci([0.08756] * 20) == (0.08756, 0.0)
    shifted = paired_difference({s: 0.08756 for s in range(20)}, {s: 0.08756 + 0.001 for s in range(20)})
    assert shifted is not None and shifted.mde == 0.0


def test_welch_difference_is_scipys_interval():
    ref, other = {0: 1.0, 1: 2.0, 2: 2.5}, {5: 1.5, 6: 2.9, 7: 3.3, 8: 2.0}
    mean, low, high = welch_difference(ref, other)
    ci = stats.ttest_ind([1.5, 2.9, 3.3, 2.0], [1.0, 2.0, 2.5], equal_var=False).confidence_interval(0.95)
    assert mean == pytest.approx(2.425 - 11 / 6, rel=1e-12)
    assert (low, high) == (pytest.approx(ci.low, rel=1e-12), pytest.approx(ci.high, rel=1e-12))
    assert welch_difference({0: 1.0}, other) is None


def _vectors() -> list[list[float]]:
    rng = random.Random(7)
    vectors = [[], [0.03], [1.0], [0.0, 1.0], [0.01, 0.01, 0.01], [0.04, 0.04, 0.2, 1.0, 1.0],
               [0.001, 0.02, 0.02, 0.5, 0.013, 1.0, 0.049]]
    for n in (2, 5, 12, 40):
        vectors.append([rng.random() ** 3 for _ in range(n)])
        # ties and p = 1 among random values, in no particular order
        tied = [round(rng.random() ** 2, 2) for _ in range(n)] + [1.0, 1.0]
        rng.shuffle(tied)
        vectors.append(tied)
    return vectors


@pytest.mark.parametrize("method,ours", [("holm", holm), ("fdr_bh", benjamini_hochberg)])
def test_corrections_match_statsmodels(method, ours):
    from statsmodels.stats.multitest import multipletests

    for p in _vectors():
        got = ours(p)
        assert len(got) == len(p)
        if p:
            expected = multipletests(p, method=method)[1]
            assert got == pytest.approx(list(expected), abs=1e-12, rel=0), p
        assert all(q >= x for q, x in zip(got, p, strict=True))  # adjusting never lowers p
        assert all(q <= 1.0 for q in got)


def test_corrections_are_monotone_in_the_raw_order():
    p = [0.03, 0.001, 0.2, 0.03, 0.9, 0.011]
    for adjusted in (holm(p), benjamini_hochberg(p)):
        ranked = [adjusted[i] for i in sorted(range(len(p)), key=p.__getitem__)]
        assert ranked == sorted(ranked)
        assert adjusted[0] == adjusted[3]  # ties get the same adjusted value
    assert holm(p)[1] == pytest.approx(0.006)  # the smallest times m
    assert holm([0.5, 0.6]) == [1.0, 1.0]  # capped
    assert benjamini_hochberg([0.04, 0.03]) == [0.04, 0.04]  # step-up: the largest's m/m


def test_corrections_refuse_what_is_not_a_p_value():
    with pytest.raises(ValueError, match="nan"):
        holm([0.1, math.nan])
    with pytest.raises(ValueError, match="1.5"):
        benjamini_hochberg([1.5])
