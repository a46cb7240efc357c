"""Comparison tables: one per metric, the paired differences of a page corrected for
multiplicity as one family (checked against statsmodels), and the forest plot's numbers."""

from __future__ import annotations

import csv
import io
import math

import pytest

from noisevalue.experiments.figures import forest_panel
from noisevalue.experiments.paired import p_value, paired_difference, welch_difference
from noisevalue.experiments.results import ResultTable, Row, Run
from noisevalue.experiments.tables import (
    csv_text,
    markdown,
    metric_names,
    page_family,
    page_markdown,
    tables_for,
    write_tables,
)


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


# A page of 3 metrics x 5 rows against vanilla over 8 seeds, from fixed numbers: the rater
# is far better on the held-out loss, oracle far worse, max_norm and min_norm slightly off.
LABELS = ["rater", "random_rater", "oracle", "max_norm", "min_norm"]
BASE = {"heldout_loss": 0.08, "fd_digits": 10.0, "kid_digits": 0.02}
SHIFT = {"heldout_loss": [-3.0, 0.0, 0.9, 0.2, -0.3], "fd_digits": [0.1, 0.0, -0.2, 0.3, 0.0],
         "kid_digits": [0.0, -0.1, 0.2, 0.0, 0.1]}  # per row, in % of the metric


def page_runs() -> list[Run]:
    runs = []
    for seed in range(8):
        for j, label in enumerate(["vanilla", *LABELS]):
            row = {}
            for metric, base in BASE.items():
                v = base * (1 + (seed % 3) / 100)  # a spread between seeds that every row shares
                if j:
                    wobble = ((seed * 37 + j * 11) % 17 - 8) / 8  # in [-1, 1]: the pairs' spread
                    v += base / 100 * (SHIFT[metric][j - 1] + 0.5 * wobble)
                row[metric] = v
            history = [{"step": 102, **row}, {"step": 104, **{k: 0.99 * x for k, x in row.items()}}]
            runs.append(Run(label, seed, 100, {"step": 100, **BASE}, history))
    return runs


def test_the_tests_of_a_page_are_one_family(tmp_path):
    from statsmodels.stats.multitest import multipletests

    tables = tables_for("t", page_runs(), reference="vanilla")
    paths = write_tables(tables, tmp_path, "compare")
    assert [p.name for p in paths] == ["compare.md", "compare.csv", "compare.png", "compare_curves.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths[2:])

    # the family: all 15 tests at +4, p from the paired t-test of each row's values
    raw = [paired_difference(t.rows[0].values[4], r.values[4]).p for t in tables for r in t.rows[1:]]
    family = page_family(tables)
    assert [c.p for c in family.tests] == raw and len(raw) == 15
    holm, bh = list(multipletests(raw, method="holm")[1]), list(multipletests(raw, method="fdr_bh")[1])
    # the construction has what the test is about: one significant after Holm, one only unadjusted
    unadjusted_only = [i for i in range(15) if raw[i] < 0.05 < holm[i]]
    assert unadjusted_only and min(holm) < 0.05

    md = paths[0].read_text()
    assert md.splitlines()[-1] == ("Holm and Benjamini-Hochberg over the 15 paired tests on this page: "
                                   "3 metrics x 5 runs at +4.")
    assert "| run | seeds | difference | 95% CI | relative | p | p (Holm) | p (BH) | MDE (80% power) | verdict |" in md
    sections = {m: md[md.index(f"t: {m} "):] for m in BASE}
    for i, c in enumerate(family.tests):
        line = next(x for x in sections[c.table.metric].splitlines() if x.startswith(f"| {c.row.label} | 8 |"))
        cells = [x.strip() for x in line.split("|")[1:-1]]
        assert cells[5:8] == [f"{raw[i]:.3g}", f"{holm[i]:.3g}", f"{bh[i]:.3g}"]
        if holm[i] < 0.05:
            assert cells[9] == "significant after Holm, " + ("better" if c.paired.mean < 0 else "worse")
        elif raw[i] < 0.05:
            assert cells[9] == "not significant (p < 0.05 unadjusted only)"
        else:
            assert cells[9] == "not significant"
    assert "significant after Holm, better" in sections["heldout_loss"].split("t: fd_digits")[0]

    text = paths[1].read_bytes().decode()  # csv writes \r\n line ends
    assert text == csv_text(tables) == csv_text(tables_for("t", page_runs(), reference="vanilla"))
    rows = list(csv.DictReader(io.StringIO(text)))
    last = [r for r in rows if r["seed"] == "mean" and r["step"] == "104" and r["run"] != "vanilla"]
    assert [float(r["p_vs_reference"]) for r in last] == raw
    assert [float(r["p_holm"]) for r in last] == pytest.approx(holm, abs=1e-12, rel=0)
    assert [float(r["p_bh"]) for r in last] == pytest.approx(bh, abs=1e-12, rel=0)
    assert {r["p_holm"] for r in rows if r["step"] != "104" or r["seed"] != "mean"} == {""}


def test_welch_rows_and_every_reference_count_in_the_family():
    ref = Row("vanilla", 0, {}, {2: {0: 1.0, 1: 1.2, 2: 0.9, 3: 1.1}})
    rater = Row("rater", 0, {}, {2: {0: 0.8, 1: 1.1, 2: 0.7, 3: 0.95}})
    other = Row("other", 0, {}, {2: {10: 1.3, 11: 1.6, 12: 1.2}})  # no shared seed: Welch
    table = ResultTable("t", "fid", [ref, rater, other], reference="vanilla", also_against=("rater",))
    family = page_family([table])
    pairs = [(ref, rater), (ref, other), (rater, ref), (rater, other)]
    assert [(c.reference.label, c.row.label) for c in family.tests] == [(a.label, b.label) for a, b in pairs]
    raw = [p_value(a.values[2], b.values[2]) for a, b in pairs]
    assert [c.p for c in family.tests] == raw
    from statsmodels.stats.multitest import multipletests

    assert family.holm == pytest.approx(list(multipletests(raw, method="holm")[1]), abs=1e-12, rel=0)
    text = page_markdown([table])
    assert text.splitlines()[-1] == ("Holm and Benjamini-Hochberg over the 4 tests (2 unpaired: Welch's) on this page: "
                                     "1 metric x 2 runs x 2 references at +2.")
    assert f"| other | unpaired | - | - | - | {raw[1]:.3g} | {family.holm[1]:.3g} | {family.bh[1]:.3g} |" in text
    assert markdown(table) == text  # a table alone is a page of its own


def test_the_forest_plot_shows_the_paired_differences():
    tables = tables_for("t", page_runs(), reference="vanilla")
    panel = forest_panel(tables[0])
    assert panel is not None and panel.relative and panel.step == 4
    assert panel.xlabel == "difference from vanilla at +4, % of its mean (negative is better)"
    assert [r.label for r in panel.rows] == LABELS
    for row, r in zip(panel.rows, tables[0].rows[1:], strict=True):
        d = paired_difference(tables[0].rows[0].values[4], r.values[4])
        assert (row.mean, row.low, row.high) == pytest.approx(
            (100 * d.mean / d.reference_mean, 100 * d.low / d.reference_mean, 100 * d.high / d.reference_mean),
            rel=1e-12)
        assert row.low < row.mean < row.high


def test_the_forest_plot_without_pairs_or_intervals():
    one = ResultTable("t", "fid", [Row("vanilla", 0, {}, {2: {0: 4.0}}), Row("rater", 0, {}, {2: {0: 3.0}})],
                      reference="vanilla")
    panel = forest_panel(one)  # one seed: the point, no interval
    assert panel is not None and panel.relative
    assert panel.rows[0].mean == -25.0 and math.isnan(panel.rows[0].low) and math.isnan(panel.rows[0].high)

    ref, other = {0: 1.0, 1: 1.2, 2: 0.9}, {10: 1.3, 11: 1.6, 12: 1.2}
    rater = {0: 0.8, 1: 1.1, 2: 0.7}
    mixed = ResultTable("t", "fid", [Row("vanilla", 0, {}, {2: ref}), Row("rater", 0, {}, {2: rater}),
                                     Row("other", 0, {}, {2: other})], reference="vanilla")
    panel = forest_panel(mixed)  # a row without shared seeds: all in the metric's units
    assert panel is not None and not panel.relative
    assert panel.xlabel == "difference from vanilla at +2 (negative is better)"
    assert [r.label for r in panel.rows] == ["rater", "other (unpaired)"]
    d = paired_difference(ref, rater)
    assert (panel.rows[0].mean, panel.rows[0].low, panel.rows[0].high) == (d.mean, d.low, d.high)
    assert (panel.rows[1].mean, panel.rows[1].low, panel.rows[1].high) == welch_difference(ref, other)
    assert forest_panel(ResultTable("t", "fid", mixed.rows, reference=None)) is None
