"""``noisevalue ablate`` end to end at a tiny size, and the multi-seed result tables."""

import csv
import json
import math

import pytest
from scipy import stats
from typer.testing import CliRunner

from noisevalue.checkpoint import read_meta, resolve_checkpoint
from noisevalue.cli import app
from noisevalue.experiments.paired import mean_ci, p_value
from noisevalue.experiments.results import ResultTable, Row
from noisevalue.experiments.tables import markdown
from tests.conftest import TINY
from tests.test_protocol import META

runner = CliRunner()
FAST = [*TINY, *META, "meta.outer_steps=2", "select.steps=2", "select.eval_every=2",
        "eval.evaluators=[{name: fid, params: {features: digits}}]", "eval.num_samples=20"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def table_rows(path, metric="fd_digits"):
    """The CSV lines of one metric, its value under the metric's name."""
    rows = [r for r in csv.DictReader(path.open()) if r["metric"] == metric]
    return [{**r, metric: r["value"]} for r in rows]


def test_ablate_variants_share_the_start_and_switch_inputs_off(tmp_path):
    out = tmp_path / "run"
    args = ["ablate", *FAST, f"output_dir={out}", "--remove", "timestep", "--noise-only"]
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = table_rows(out / "ablate" / "ablation.csv")
    assert {r["run"] for r in rows} == {"full rater (k=4)", "w/o timestep", "noise only", "vanilla (k=1)"}
    starts = {r["fd_digits"] for r in rows if r["step"] == "4"}
    assert len(starts) == 1  # all continue from the same stage-(i) checkpoint
    assert {int(r["step"]) for r in rows} == {4, 6}

    # the variants' raters really lack the removed inputs
    no_t = read_meta(resolve_checkpoint(out / "ablate" / "no-timestep" / "rater")).rater.params
    assert no_t["use_timestep"] is False and no_t.get("use_image", True) is not False
    only = read_meta(resolve_checkpoint(out / "ablate" / "noise-only" / "rater")).rater.params
    assert (only["use_timestep"], only["use_image"], only["use_label"]) == (False, False, False)

    # the full-rater row is the protocol's own rater continuation, and differs from the variants
    full = json.loads((out / "select" / "rater" / "metrics.json").read_text())["history"][-1]
    by_run = {r["run"]: float(r["fd_digits"]) for r in rows if r["step"] == "6"}
    assert by_run["full rater (k=4)"] == pytest.approx(full["fd_digits"])
    assert by_run["w/o timestep"] != by_run["full rater (k=4)"]
    md = (out / "ablate" / "ablation.md").read_text()
    assert "| run | start (step 4) | +2 |" in md and "One seed (0)" in md

    again = invoke(*args)
    assert again.exit_code == 0
    assert again.output.count("reused") == 8  # pretrain, 3 raters, 4 continuations
    assert "ablation.md" in again.output


def test_ablate_over_seeds_reports_intervals_and_tests(tmp_path):
    out = tmp_path / "run"
    result = invoke("ablate", *FAST, f"output_dir={out}", "select.seeds=[0,1]", "--remove", "label")
    assert result.exit_code == 0, (result.output, result.exception)
    assert (out / "rater-seed1" / "DONE").is_file() and (out / "ablate" / "no-label" / "select-seed1" / "DONE").is_file()
    rows = table_rows(out / "ablate" / "ablation.csv")
    final = [r for r in rows if r["run"] == "w/o label" and r["step"] == "6"]
    values = [float(r["fd_digits"]) for r in final if r["seed"] in ("0", "1")]
    summary = next(r for r in final if r["seed"] == "mean")
    mean, half = mean_ci(values)
    assert float(summary["fd_digits"]) == pytest.approx(sum(values) / 2)
    assert float(summary["ci95"]) == pytest.approx(half)
    assert summary["p_vs_reference"] != ""
    assert float(summary["diff_vs_reference"]) == pytest.approx(
        sum(float(r["fd_digits"]) for r in final if r["seed"] in ("0", "1")) / 2
        - sum(float(r["fd_digits"]) for r in table_rows(out / "ablate" / "ablation.csv")
              if r["run"] == "full rater (k=4)" and r["step"] == "6" and r["seed"] in ("0", "1")) / 2)
    md = (out / "ablate" / "ablation.md").read_text()
    assert "±" in md and "Paired difference from 'full rater (k=4)'" in md
    assert "Paired difference from 'vanilla (k=1)'" in md
    # both references' tests are one family: every metric x 2 runs x 2 references
    assert md.splitlines()[-1].endswith(" metrics x 2 runs x 2 references at +2.")
    assert summary["p_holm"] != "" and float(summary["p_holm"]) >= float(summary["p_vs_reference"])
    assert md.index("heldout_loss") < md.index("fd_digits")  # the primary metric comes first


def test_ablate_bad_input_is_one_line(tmp_path):
    result = invoke("ablate", *FAST, f"output_dir={tmp_path / 'r'}", "--remove", "colour")
    assert result.exit_code == 2
    assert "--remove colour: expected one of timestep, image, label" in result.stderr
    no_rater = [a for a in FAST if not a.startswith("rater=")]
    result = invoke("ablate", *no_rater, f"output_dir={tmp_path / 'r'}", "~rater.params", "rater.name=norm", "--remove", "image")
    assert result.exit_code == 2
    assert "unknown parameter 'use_image' for rater 'norm'" in result.stderr
    assert not (tmp_path / "r" / "pretrain").exists()  # refused before any training


def test_mean_ci_is_the_student_t_interval():
    mean, half = mean_ci([1.0, 2.0, 3.0])
    assert mean == 2.0
    assert half == pytest.approx(4.302652729911275 * 1.0 / math.sqrt(3))
    assert math.isnan(mean_ci([5.0])[1])


def test_p_value_pairs_shared_seeds():
    ref = {0: 10.0, 1: 12.0, 2: 14.0, 3: 11.0}
    shifted = {s: v + 0.5 + 0.01 * s for s, v in ref.items()}  # a consistent small shift
    paired = p_value(ref, shifted)
    assert paired == pytest.approx(stats.ttest_rel(list(ref.values()), list(shifted.values())).pvalue)
    assert paired < 1e-3  # paired: significant; unpaired, the seed spread would hide it
    assert stats.ttest_ind(list(ref.values()), list(shifted.values()), equal_var=False).pvalue > 0.5
    disjoint = p_value({0: 1.0, 1: 2.0}, {5: 1.5, 6: 2.5})  # no shared seeds: Welch
    assert disjoint == pytest.approx(stats.ttest_ind([1.0, 2.0], [1.5, 2.5], equal_var=False).pvalue)
    assert p_value({0: 1.0}, {0: 2.0}) is None


def test_markdown_marks_significance():
    ref = Row("a", 10, {0: 5.0, 1: 5.0, 2: 5.0}, {2: {0: 4.0, 1: 4.1, 2: 4.2}})
    other = Row("b", 10, {0: 5.0, 1: 5.0, 2: 5.0}, {2: {0: 6.0, 1: 6.1, 2: 6.3}})
    text = markdown(ResultTable("t", "fid", [ref, other], reference="a"))
    assert "| a | 5.000 ± 0.000 | 4.100 ± 0.2484 |" in text
    p = stats.ttest_rel([6.0, 6.1, 6.3], [4.0, 4.1, 4.2]).pvalue
    assert "| b | 3 | +2.033 | " in text and f"| {p:.3g} |" in text and "significant after Holm, worse" in text
