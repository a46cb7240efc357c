"""Comparison tables: paired differences, intervals, p-values and the minimum detectable
effect, checked against scipy and statsmodels on fixed examples."""

from __future__ import annotations

import csv
import io
import math

import pytest
from scipy import stats

from noisevalue.experiments.tables import (
    ResultTable,
    Row,
    Run,
    csv_text,
    markdown,
    mean_ci,
    metric_names,
    minimum_detectable_effect,
    paired_difference,
    tables_for,
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


def test_tables_are_per_metric_with_the_held_out_loss_first():
    start = {"step": 10, "fd_digits": 9.0, "heldout_loss": 0.09, "kid_digits": 0.01, "baseline_x/fd_digits": 1.0}
    runs = [Run(label, seed, 10, start, [{"step": 12, "fd_digits": 8.0 + seed + off, "heldout_loss": 0.08 + off / 100,
                                          "kid_digits": 0.01}])
            for seed in (0, 1, 2) for label, off in (("vanilla", 0.0), ("rater", 0.1 * (seed + 1)))]
    assert metric_names([start]) == ["heldout_loss", "fd_digits", "kid_digits"]
    tables = tables_for("t", runs, reference="vanilla")
    assert [t.metric for t in tables] == ["heldout_loss", "fd_digits", "kid_digits"]
    assert [r.label for r in tables[0].rows] == ["vanilla", "rater"]
    text = markdown(tables[1])
    assert "Paired difference from 'vanilla' at +2" in text
    d = paired_difference(tables[1].rows[0].values[2], tables[1].rows[1].values[2])
    assert d is not None and d.mean == pytest.approx(0.2)
    line = next(x for x in text.splitlines() if x.startswith("| rater | 3 |"))
    assert "+0.2000" in line and f"{d.p:.3g}" in line
    rows = list(csv.DictReader(io.StringIO(csv_text(tables))))
    summary = next(r for r in rows if r["run"] == "rater" and r["metric"] == "fd_digits" and r["seed"] == "mean"
                   and r["step"] == "12")
    assert float(summary["diff_vs_reference"]) == pytest.approx(0.2)
    assert float(summary["mde80"]) == pytest.approx(d.mde)
    assert {r["metric"] for r in rows} == {"heldout_loss", "fd_digits", "kid_digits"}


def test_one_seed_says_nothing_can_be_told():
    table = ResultTable("t", "heldout_loss", [Row("vanilla", 0, {0: 1.0}, {2: {0: 0.9}}),
                                              Row("rater", 0, {0: 1.0}, {2: {0: 0.8}})], reference="vanilla")
    assert "One seed (0)" in markdown(table) and "Paired difference" not in markdown(table)
