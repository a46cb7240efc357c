"""Immiscible selectors: the assignment against brute force, KNN against argmin, and a run."""

import itertools
import json

import pytest
import torch
from noisevalue_immiscible import ImmiscibleSelector, NearestNoiseSelector, assign
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app


def test_the_assignment_is_the_minimum_total_distance_of_brute_force():
    g = torch.Generator().manual_seed(0)
    for n in range(1, 7):
        x0 = torch.randn(n, 1, 4, 4, generator=g)
        noise = torch.randn(n, 1, 4, 4, generator=g)
        pick = assign(x0, noise)
        assert sorted(pick.tolist()) == list(range(n))  # a permutation
        cost = torch.cdist(x0.flatten(1).double(), noise.flatten(1).double())
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n)))
        assert float(sum(cost[i, pick[i]] for i in range(n))) == pytest.approx(float(best), rel=1e-12)


def test_the_batch_selector_indexes_the_whole_pool():
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(5, 1, 4, 4, generator=g)
    candidates = torch.randn(5, 3, 1, 4, 4, generator=g)
    sel = ImmiscibleSelector(k=3)
    pick = sel.select(x0, None, torch.zeros(5, dtype=torch.long), candidates)
    assert sel.pool == "batch" and len(set(pick.tolist())) == 5 and int(pick.max()) < 15
    assert torch.equal(pick, assign(x0, candidates.flatten(0, 1)))


def test_knn_picks_the_argmin_distance():
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(6, 1, 4, 4, generator=g)
    candidates = torch.randn(6, 4, 1, 4, 4, generator=g)
    pick = NearestNoiseSelector(k=4).select(x0, None, torch.zeros(6, dtype=torch.long), candidates)
    for i in range(6):
        dist = [float((candidates[i, j] - x0[i]).norm()) for j in range(4)]
        assert int(pick[i]) == dist.index(min(dist))


def test_entry_points_and_bad_values():
    assert registry.get("selector", "immiscible") is ImmiscibleSelector
    assert registry.get("selector", "immiscible_knn") is NearestNoiseSelector
    result = CliRunner().invoke(app, ["recipe", "validate", "digits", "select.methods.knn={name: immiscible_knn, params: {k: 0}}"])
    assert result.exit_code == 2 and "selector 'immiscible_knn': k must be an integer >= 1, got 0" in result.stderr


def test_both_train_in_a_tiny_comparison(tmp_path):
    from tests.conftest import TINY

    args = [*TINY, f"output_dir={tmp_path}", "select.steps=2", "select.eval_every=2",
            "--method", "immiscible", "--method", "immiscible_knn"]
    result = CliRunner().invoke(app, ["compare", *[str(a) for a in args]])
    assert result.exit_code == 0, (result.output, result.exception)
    runs = {line.split("|")[1].strip() for line in (tmp_path / "compare.md").read_text().splitlines()
            if line.startswith("| immiscible")}
    assert runs == {"immiscible", "immiscible_knn"}
    stage = json.loads((tmp_path / "select" / "immiscible" / "stage.json").read_text())
    assert stage["train.selector.name"] == "immiscible"
