"""Every stored metric carries the protocol it was computed under; the tables flag a metric
computed under different protocols; ``noisevalue eval`` prints and records its protocol."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.experiments import stages
from noisevalue.experiments.results import Run
from noisevalue.experiments.tables import markdown, tables_for
from noisevalue.train import metric_protocol as mp
from tests.conftest import TINY

runner = CliRunner()
EVALUATED = [o for o in TINY if not o.startswith("eval.evaluators")] + ["eval.num_samples=20", "eval.baselines=false"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """The digits default at a tiny size (guidance 1.5), and the same with 3 sampling steps instead of 2."""
    root = tmp_path_factory.mktemp("protocol")
    for name, extra in (("a", []), ("b", ["sample.num_steps=3"])):
        result = runner.invoke(app, ["run", *EVALUATED, f"output_dir={root / name}", *extra])
        assert result.exit_code == 0, result.output
    return root / "a", root / "b"


def test_every_stored_metric_names_its_protocol(two_runs):
    run, _ = two_runs
    data = json.loads((run / "metrics.json").read_text())
    for row in data["history"]:
        named = row[mp.ROW_KEY]
        assert set(named) == {k for k in row if k not in ("step", mp.ROW_KEY)}  # every metric, no more
        for metric, digest in named.items():
            assert mp.digest(data["protocols"][digest]) == digest, metric
    last = data["history"][-1][mp.ROW_KEY]
    sample = data["protocols"][last["fd_digits"]]
    assert last["kid_digits"] == last["fd_digits"]  # one evaluator, one protocol
    assert sample["sampling"] == {"sampler": {**mp.SAMPLER, "steps": 2, "eta": 0.0}, "guidance": 1.5, "nag_scale": 0.0,
                                  "samples": 20, "weights": "ema"}
    assert sample["features"]["features"] == "digits" and sample["features"]["digit_features"]  # the classifier's key
    assert len(sample["reference"]["sha256"]) == 16 and "eval_dataset" in sample["reference"]["label"]
    assert sample["evaluator"]["name"] == "fid" and sample["evaluator"]["distribution"] == "noisevalue"
    assert sample["evaluator"]["version"] == mp.version("noisevalue")
    loss = data["protocols"][last["heldout_loss"]]
    assert loss["kind"] == "heldout_loss" and loss["images"] == 24 and loss["draws"] == 2


def test_the_tables_flag_a_metric_computed_under_two_protocols(two_runs):
    a, b = two_runs
    digests = [json.loads((r / "metrics.json").read_text())["history"][-1][mp.ROW_KEY] for r in (a, b)]
    assert digests[0]["heldout_loss"] == digests[1]["heldout_loss"]  # sampling does not touch the loss
    assert digests[0]["fd_digits"] != digests[1]["fd_digits"]
    runs = [Run("vanilla", 0, 0, None, stages.evaluations(a)), Run("other", 0, 0, None, stages.evaluations(b))]
    tables = {t.metric: t for t in tables_for("t", runs, "vanilla")}
    assert tables["heldout_loss"].protocol_note is None
    note = tables["fd_digits"].protocol_note
    assert note is not None and "2 different protocols" in note and "sampling.sampler.steps" in note
    assert "sampling.samples" not in note  # only what differs is named
    assert note in markdown(tables["fd_digits"])
    same = tables_for("t", [runs[0], Run("again", 1, 0, None, stages.evaluations(a))], "vanilla")
    assert all(t.protocol_note is None for t in same)


def test_eval_prints_and_records_its_protocol(two_runs, tmp_path):
    run, _ = two_runs
    out = tmp_path / "samples"
    assert runner.invoke(app, ["sample", str(run), "--num", "12", "--steps", "3", "--out", str(out)]).exit_code == 0
    result = runner.invoke(app, ["eval", str(out / "samples.npz"), "--reference", "digits", "--num", "10"])
    assert result.exit_code == 0, result.output
    record = json.loads((out / "eval.json").read_text())
    protocol = record["protocol"]
    assert record["protocol_sha256"] == mp.digest(protocol)
    assert protocol["sampling"]["sampler"]["steps"] == 3 and protocol["sampling"]["samples"] == 10
    assert protocol["features"]["features"] == "digits"
    assert f"protocol {record['protocol_sha256']}:" in result.output
    assert "  sampling.sampler.steps: 3" in result.output and "  sampling.samples: 10" in result.output
    # images from elsewhere: their sampling is unknown, and said to be
    copied = tmp_path / "elsewhere" / "samples.npz"
    copied.parent.mkdir()
    copied.write_bytes((out / "samples.npz").read_bytes())
    result = runner.invoke(app, ["eval", str(copied), "--reference", "digits", "--num", "10"])
    assert result.exit_code == 0, result.output
    assert json.loads((copied.parent / "eval.json").read_text())["protocol"]["sampling"] is None
    assert "  sampling: null" in result.output
