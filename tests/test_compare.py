"""noisevalue compare: selectors and loss weightings from one stage-(i) checkpoint."""

import csv
import json

from typer.testing import CliRunner

from noisevalue.cli import app
from tests.test_protocol import META

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_compare_runs_selectors_and_loss_weightings_with_paired_seeds(tmp_path, tiny_overrides):
    args = ["compare", *tiny_overrides, *META, "meta.outer_steps=2", "select.steps=4", "select.eval_every=4",
            "select.seeds=[0,1]", "--method", "min_snr", "--method", "max_norm", "--method", "rater",
            "eval.evaluators=[{name: fid, params: {features: digits}}]", "eval.num_samples=20", "eval.baselines=false"]
    first = invoke(*args)
    assert first.exit_code == 0, (first.output, first.exception)
    root = tmp_path / "run"
    rows = list(csv.DictReader((root / "compare.csv").open()))
    assert [m for m in dict.fromkeys(r["run"] for r in rows)] == ["vanilla", "min_snr", "max_norm", "rater"]
    # a loss weighting continues with i.i.d. noise; a selector with the recipe's uniform loss
    weighted = json.loads((root / "select" / "min_snr-seed1" / "stage.json").read_text())
    assert weighted["train.loss_weighting.name"] == "min_snr" and weighted["train.selector.params"] == {"k": 1}
    chosen = json.loads((root / "select" / "max_norm" / "stage.json").read_text())
    assert chosen["train.selector.name"] == "max_norm" and chosen["train.loss_weighting.name"] == "uniform"
    # NoiseRater is a method like the others: a stage-(ii) rater per seed, handed to its continuation
    rater_stage = json.loads((root / "select" / "rater-seed1" / "stage.json").read_text())
    assert rater_stage["train.selector.params"]["checkpoint"] == str(root / "rater-seed1")
    md = (root / "compare.md").read_text()
    assert "Paired difference from 'vanilla'" in md and "| min_snr | 2 |" in md  # paired over both seeds
    family = md.splitlines()[-1]  # every test of the page corrected together
    assert family.startswith("Holm and Benjamini-Hochberg over the ") and " x 3 runs at +" in family
    assert all((root / name).stat().st_size > 0 for name in ("compare.png", "compare_curves.png"))
    assert "compare_curves.png" in first.output
    wall = (root / "compare_timings.md").read_text().split("Wall time of each continuation")[1]
    for label, kind in (("vanilla", "selector"), ("min_snr", "loss weighting"), ("rater", "selector")):
        line = next(r for r in wall.splitlines() if r.startswith(f"| {label} |"))
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[1] == kind and float(cells[2]) > 0
    assert "| vanilla | selector |" in wall and "| 1.00 |" in wall
    # vanilla and min_snr start from the same checkpoint and seeds but end apart
    def values(run, step):
        return [r["value"] for r in rows if r["run"] == run and r["metric"] == "heldout_loss"
                and r["step"] == step and r["seed"] in ("0", "1")]

    assert values("vanilla", "4") == values("min_snr", "4")  # the shared start, per seed
    assert values("vanilla", "8") != values("min_snr", "8")
    # the start is scored per seed, with the seed of its continuations: stage (i)'s last
    # evaluation for seed 0, a 0-step continuation with seed 1 (its sample noise) for seed 1
    def start(metric, seed):
        return next(float(r["value"]) for r in rows if r["run"] == "vanilla" and r["metric"] == metric
                    and r["step"] == "4" and r["seed"] == str(seed))

    pretrain = json.loads((root / "pretrain" / "metrics.json").read_text())["history"][-1]
    seed1 = json.loads((root / "start-seed1" / "metrics.json").read_text())["history"][-1]
    assert seed1["step"] == pretrain["step"] == 4
    assert json.loads((root / "start-seed1" / "stage.json").read_text())["seed"] == 1
    assert start("fd_digits", 0) == pretrain["fd_digits"] and start("fd_digits", 1) == seed1["fd_digits"]
    assert start("fd_digits", 0) != start("fd_digits", 1)
    assert start("heldout_loss", 0) == start("heldout_loss", 1) == pretrain["heldout_loss"]  # no seed in it

    # what selection did to the noise: max-norm's pick of 4 is Beta(4, 1) in the PIT (mean
    # 0.8, sd 0.02 over the 64 samples of two seeds), vanilla's uniform (mean 0.5, sd 0.036)
    noise = list(csv.DictReader((root / "compare_noise.csv").open()))
    pit = {r["run"]: float(r["pit_mean"]) for r in noise if r["bin"] == "all" and r["seed"] == "0"}
    assert pit["max_norm"] > 0.65 > pit["vanilla"] > 0.35
    per_seed = [json.loads((root / "select" / d / "noise_stats.json").read_text()) for d in ("max_norm", "max_norm-seed1")]
    pooled = sum(s["all"]["pit_mean"] * s["all"]["count"] for s in per_seed) / sum(s["all"]["count"] for s in per_seed)
    row = next(r for r in (root / "compare_noise.md").read_text().splitlines() if r.startswith("| max_norm |")
               and r.count("|") == 13 and abs(float(r.split("|")[-2]) - pooled) < 1e-3)
    assert row and per_seed[0]["all"]["count"] == 32  # 4 steps x 8 samples

    second = invoke(*args)  # everything reused, the same tables
    assert second.exit_code == 0 and "starting" not in second.output
    assert (root / "compare.md").read_text() == md


def test_an_unknown_method_stops_before_anything_is_written(tmp_path, tiny_overrides):
    result = invoke("compare", *tiny_overrides, "--method", "min-snr")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "--method min-snr: unknown method 'min-snr' (selectors:" in err
    assert "loss weightings: min_snr, p2, uniform" in err
    bad = invoke("compare", *tiny_overrides, "--method", "p2", "select.methods.p2={name: p2, params: {gamma: 0}}")
    assert bad.exit_code == 2 and "gamma must be a finite number > 0, got 0" in bad.stderr
    assert not (tmp_path / "run").exists()


def test_budget_wall_sets_each_method_against_vanilla_trained_for_its_wall_time(tmp_path, tiny_overrides):
    import statistics

    args = ["compare", *tiny_overrides, "select.steps=4", "select.eval_every=4", "select.seeds=[0,1]",
            "--method", "oracle", "--budget", "wall"]
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    root = tmp_path / "run"
    def per_step(method):  # the median over both seeds' log windows of seconds per step of 8 images
        lines = [json.loads(line) for d in (method, f"{method}-seed1")
                 for line in (root / "select" / d / "timings.jsonl").read_text().splitlines()]
        return statistics.median(8 / t["train/images_per_sec"] for t in lines if "train/images_per_sec" in t)

    n = max(1, round(4 * per_step("oracle") / per_step("vanilla")))
    assert n > 4  # the oracle's forward-mode pass over 4 candidates costs more than a step
    rows = list(csv.DictReader((root / "compare_budget.csv").open()))
    ref = f"vanilla, {n} steps (the wall of oracle's 4)"
    for seed, folder in ((0, f"vanilla-{n}steps"), (1, f"vanilla-{n}steps-seed1")):
        history = json.loads((root / "select" / folder / "metrics.json").read_text())["history"]
        trained = next(h for h in history if h["step"] == 4 + n)  # n steps from the step-4 checkpoint
        shown = next(r for r in rows if r["run"] == ref and r["seed"] == str(seed) and r["metric"] == "heldout_loss")
        assert float(shown["value"]) == trained["heldout_loss"] and shown["step"] == "8"
        oracle = json.loads((root / "select" / ("oracle" if seed == 0 else "oracle-seed1") / "metrics.json").read_text())
        got = next(r for r in rows if r["run"] == "oracle" and r["seed"] == str(seed) and r["metric"] == "heldout_loss")
        assert float(got["value"]) == oracle["history"][-1]["heldout_loss"]
    assert "oracle against vanilla on the same wall" in (root / "compare_budget.md").read_text()


def test_budget_flops_counts_the_selection_on_top_of_the_training_step(tmp_path, tiny_overrides):
    """A loss weighting costs what vanilla costs: its vanilla on the same FLOPs trains the same
    4 steps, so it equals vanilla's own continuation exactly. The oracle's forward-mode pass
    over 4 candidates costs several training steps."""
    from noisevalue.config import Component, load_recipe
    from noisevalue.experiments.budget import step_flops

    args = ["compare", *tiny_overrides, "select.steps=4", "select.eval_every=4", "select.seeds=[0,1]",
            "--method", "min_snr", "--method", "oracle", "--budget", "flops"]
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    root = tmp_path / "run"
    recipe = load_recipe("digits", [*tiny_overrides, "select.steps=4"])
    vanilla = step_flops(recipe, Component(name="random", params={"k": 1}), root / "pretrain")
    oracle = step_flops(recipe, Component(name="oracle", params={"k": 4}), root / "pretrain")
    n = round(4 * oracle / vanilla)
    assert n > 8
    rows = list(csv.DictReader((root / "compare_budget.csv").open()))
    for seed in ("0", "1"):
        def value(run, seed=seed):
            return next(float(r["value"]) for r in rows if r["run"] == run and r["seed"] == seed
                        and r["metric"] == "heldout_loss")

        own = json.loads((root / "select" / ("vanilla" if seed == "0" else "vanilla-seed1") / "metrics.json").read_text())
        assert value("vanilla, 4 steps (the flops of min_snr's 4)") == own["history"][-1]["heldout_loss"]
        assert value(f"vanilla, {n} steps (the flops of oracle's 4)") != own["history"][-1]["heldout_loss"]
    assert (root / "select" / f"vanilla-{n}steps-seed1" / "DONE").is_file()


def test_an_unknown_budget_stops_before_anything_is_written(tmp_path, tiny_overrides):
    result = invoke("compare", *tiny_overrides, "--budget", "flop")
    assert result.exit_code == 2
    assert result.stderr.strip() == "noisevalue: error: --budget: expected one of wall, flops, got 'flop'"
    assert not (tmp_path / "run").exists()
