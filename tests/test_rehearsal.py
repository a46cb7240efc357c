"""The paper's recipe rehearsed at its own process counts on the CPU: the CI-sized version of
``benchmarks/rehearsal.py`` (``imagenet_cond`` changed in sizes only, with stand-in data,
VAE and Inception weights) in one process, under ``--nproc-per-node 4`` and as two
launchers of 2 processes on the loopback address."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STAGES = ["pretrain", "rater", "rater-untrained", *(f"select/{m}" for m in
                                                     ("vanilla", "rater", "random_rater", "max_norm", "min_norm"))]


def load_rehearsal():
    spec = importlib.util.spec_from_file_location("rehearsal", ROOT / "benchmarks" / "rehearsal.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_paper_recipe_runs_on_4_processes_and_2_machines_as_on_one(tmp_path):
    rehearsal = load_rehearsal()
    report = rehearsal.rehearse(tmp_path, "small", procs=4, say=lambda _: None)
    layouts = ["1 process", "4 processes", "2 x 2 processes"]
    assert list(report["eval_only"]) == list(report["protocol"]) == layouts
    for row in report["protocol"].values():  # every stage of the protocol completed
        out = Path(row["out"])
        assert all((out / stage / "DONE").is_file() for stage in STAGES), out
        assert (out / "comparison.md").is_file()
    for label in layouts[1:]:
        # the same weights evaluated: the metrics of one process, by design (measured: equal)
        row = report["eval_only"][label]
        assert set(row["metrics"]["."]) >= {"heldout_loss", "fid"}
        assert max(row["max_rel_diff"].values()) <= 1e-6, (label, row["max_rel_diff"])
        # training: the same draws on every layout; only the summation order of the
        # gradient average differs (measured: at most 8e-8)
        assert report["protocol"][label]["weights_rel_diff"] < 1e-4, label


def test_a_reused_rehearsal_launches_only_what_has_no_figures(tmp_path, monkeypatch):
    """``--reuse``: a finished run (its ``<run>.json``) is read back, not launched; an
    interrupted one (its folder, no figures) resumes where it stopped; the rest start afresh."""
    rehearsal = load_rehearsal()
    monkeypatch.setattr(rehearsal, "make_standins", lambda work, size: None)
    finished = {"wall_s": 5.0, "peak_kib": {"launcher 0": 2048}, "metrics": {".": {"fid": 1.0}},
                "eval_s": {".": 3.0}, "out": str(tmp_path / "eval_only-1x1"), "resumed": False}
    (tmp_path / "eval_only-1x1.json").write_text(json.dumps(finished))
    (tmp_path / "protocol-1x1").mkdir()  # interrupted: a folder without figures
    launched = []

    def launch(work, name, extra, size, layout, env, resume=False):
        launched.append((name, resume))
        (work / name).mkdir(exist_ok=True)
        return 7.0, {"launcher 0": 1024}, work / name

    monkeypatch.setattr(rehearsal, "launch", launch)
    monkeypatch.setattr(rehearsal, "weight_difference", lambda one, other: 0.0)
    report = rehearsal.rehearse(tmp_path, "small", procs=4, say=lambda _: None, reuse=True)
    assert launched == [("eval_only-1x4", False), ("eval_only-2x2", False), ("protocol-1x1", True),
                        ("protocol-1x4", False), ("protocol-2x2", False)]
    assert report["eval_only"]["1 process"] == finished
    assert report["protocol"]["1 process"]["resumed"] is True
    table = rehearsal.markdown(report)
    assert "| the protocol | 1 process | 7 (resumed launch only) |" in table
    assert "| evaluation of the initial weights | 1 process | 5 | 3 | launcher 0: 2 |" in table
    # each launched run left its figures for the next reuse
    assert sorted(p.name for p in tmp_path.glob("*.json")) == sorted(
        f"{kind}-{layout}.json" for kind in ("eval_only", "protocol") for layout in ("1x1", "1x4", "2x2"))
