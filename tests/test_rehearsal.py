"""The paper's recipe rehearsed at its own process counts on the CPU: the CI-sized version of
``benchmarks/rehearsal.py`` (``imagenet_cond`` changed in sizes only, with stand-in data,
VAE and Inception weights) in one process, under ``--nproc-per-node 4`` and as two
launchers of 2 processes on the loopback address."""

import importlib.util
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
