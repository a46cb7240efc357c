"""Comparison tables: one per metric, with the paired differences of :mod:`.paired` (whose
own tests are in test_paired.py)."""

from __future__ import annotations

import csv
import io

import pytest

from noisevalue.experiments.paired import paired_difference
from noisevalue.experiments.tables import (
    ResultTable,
    Row,
    Run,
    csv_text,
    markdown,
    metric_names,
    tables_for,
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
