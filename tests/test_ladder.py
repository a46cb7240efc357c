"""noisevalue ladder: short continuations per optimizer, method and seed from one stage-(i)
checkpoint, scored after each horizon."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from noisevalue.cli import app

runner = CliRunner()

RATER = [
    "rater={name: dual_stream_tiny, params: {hidden_size: 32, depth: 1, num_heads: 2}}",
    "meta.inner_steps=2", "meta.groups=4", "meta.group_size=3", "meta.val_batch_size=8", "meta.outer_steps=2",
]
LADDER = [
    "ladder.seeds=[0,1]", "ladder.horizons=[1,2]",
    "ladder.optimizers={sgd: {name: sgd, lr: 0.01}, adamw: {name: adamw, lr: 1.0e-3}}",
    "ladder.methods={vanilla: {name: random, params: {k: 1}}, oracle: {name: oracle, params: {k: 3, val_batch_size: 4}},"
    " oracle_precond: {name: oracle_precond, params: {k: 3, val_batch_size: 4}},"
    " random_rater: {name: random_rater, params: {k: 3}}, min_norm: {name: min_norm, params: {k: 3}}}",
    "ladder.also_against={min_norm: random_rater}",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def hand_sgd_step_loss(overrides, seed):
    """Held-out loss of the stage-(i) checkpoint, and after one plain SGD step (lr 0.01)
    from it on candidate 0 of the step's pool, written out from the trainer's draws."""
    from noisevalue import checkpoint as ckpt
    from noisevalue.config import load_recipe
    from noisevalue.diffusion import Diffusion
    from noisevalue.distributed import DistInfo
    from noisevalue.train.batches import GlobalOrder, draw_conditions, draw_noise
    from noisevalue.train.build import checkpoint_backbone
    from noisevalue.train.data import load_train_data
    from noisevalue.train.evaluate import HeldoutLoss
    from noisevalue.train.reference import run_reference

    recipe = load_recipe(None, overrides)
    path = ckpt.resolve_checkpoint(f"{recipe.output_dir}/pretrain")
    meta = ckpt.read_meta(path)
    model = checkpoint_backbone(path, meta.backbone, "model", "test", str(path))
    diffusion = Diffusion.from_config(recipe.diffusion)
    info = DistInfo()
    data, encoder = load_train_data(recipe, path, info)
    step, batch = meta.step, recipe.train.global_batch_size
    t, drop, flip = draw_conditions(seed, step, batch, diffusion.num_timesteps, model.class_dropout_prob, False)
    x0, y = data.fetch(GlobalOrder(data.num_items, seed).batch(step, batch), flip)
    y = torch.where(drop, torch.full_like(y, data.num_classes), y)
    noise = draw_noise(seed, step, 0, batch, data.latent_shape, 1)[:, 0]
    heldout = HeldoutLoss(recipe, run_reference(recipe).dataset(), encoder, data.num_classes, info)
    before = heldout(model.eval(), diffusion)
    model.train()
    loss = diffusion.per_sample_loss(model, x0, t, y, noise).mean()
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, params)
    with torch.no_grad():
        for p, g in zip(params, grads, strict=True):
            p -= 0.01 * g
    return before, heldout(model.eval(), diffusion)


def test_ladder_steps_scores_and_reuses_its_cells(tmp_path, tiny_overrides):
    args = ["ladder", *tiny_overrides, *RATER, *LADDER]
    first = invoke(*args)
    assert first.exit_code == 0, (first.output, first.exception)
    root = tmp_path / "run" / "ladder"
    cells = {}
    for opt in ("sgd", "adamw"):
        for method in ("vanilla", "oracle", "oracle_precond", "random_rater", "min_norm"):
            for seed in (0, 1):
                cells[opt, method, seed] = json.loads((root / "cells" / opt / method / f"seed{seed}.json").read_text())
    # vanilla's first SGD step is one plain SGD step on candidate 0, as written out by hand
    for seed in (0, 1):
        before, expected = hand_sgd_step_loss([*tiny_overrides, *RATER], seed)
        assert cells["sgd", "vanilla", seed]["raw"]["1"] == pytest.approx(expected, abs=1e-6)
    # one checkpoint for every cell: its held-out loss, scored once, is the hand-scored one
    start = cells["sgd", "vanilla", 0]["raw"]["0"]
    assert all(c["raw"]["0"] == start for c in cells.values())
    assert start == pytest.approx(before, abs=1e-7)
    assert cells["sgd", "vanilla", 0]["raw"]["1"] != cells["sgd", "vanilla", 1]["raw"]["1"]  # seeds differ
    for seed in (0, 1):
        # under SGD the preconditioned oracle is the oracle (the same picks: test_inner_loop):
        # its cell is the oracle's, marked so
        assert cells["sgd", "oracle_precond", seed]["raw"] == cells["sgd", "oracle", seed]["raw"]
        assert cells["sgd", "oracle_precond", seed]["same_as"] == "oracle"
        assert cells["sgd", "oracle_precond", seed]["wall_s"] == 0.0  # copied, not run
        assert "same_as" not in cells["adamw", "oracle_precond", seed]
        assert cells["adamw", "oracle_precond", seed]["raw"] != cells["adamw", "oracle", seed]["raw"]
        assert cells["sgd", "min_norm", seed]["raw"]["1"] != cells["sgd", "vanilla", seed]["raw"]["1"]
        assert cells["adamw", "vanilla", seed]["raw"]["2"] != cells["sgd", "vanilla", seed]["raw"]["2"]
    rows = list(csv.DictReader((root / "ladder.csv").open()))
    assert len(rows) == 2 * 5 * 2 * 2  # optimizers x methods x seeds x horizons
    row = next(r for r in rows if (r["optimizer"], r["method"], r["seed"], r["steps"]) == ("adamw", "min_norm", "1", "2"))
    assert float(row["heldout_loss"]) == cells["adamw", "min_norm", 1]["raw"]["2"]
    assert float(row["vanilla_heldout_loss"]) == cells["adamw", "vanilla", 1]["raw"]["2"]
    assert float(row["ema_heldout_loss"]) == cells["adamw", "min_norm", 1]["ema"]
    md = (root / "ladder.md").read_text()
    assert "## sgd: sgd, lr 0.01" in md and "| method | +1 | +2 | EMA +2 |" in md
    assert md.count("oracle_precond: the cells of oracle (the same picks by construction under sgd).") == 1
    line = next(x for x in md.splitlines() if x.startswith("| min_norm |"))
    diff = cells["sgd", "min_norm", 0]["raw"]["1"] - cells["sgd", "vanilla", 0]["raw"]["1"]
    diff = (diff + cells["sgd", "min_norm", 1]["raw"]["1"] - cells["sgd", "vanilla", 1]["raw"]["1"]) / 2
    assert line.split("|")[2].strip().strip("*").startswith(f"{diff:+.3g} [")
    # p and Holm's p over the page's 30 paired tests: 2 optimizers x (4 methods against vanilla
    # + min_norm against random_rater) x 3 columns
    from scipy import stats
    from statsmodels.stats.multitest import multipletests

    keys, raw = [], []
    pairs = [(m, "vanilla") for m in ("oracle", "oracle_precond", "random_rater", "min_norm")]
    for opt in ("sgd", "adamw"):
        for method, ref in [*pairs, ("min_norm", "random_rater")]:
            for col in ("1", "2", "ema"):
                def loss(m, seed, col=col, opt=opt):
                    cell = cells[opt, m, seed]
                    return cell["ema"] if col == "ema" else cell["raw"][col]

                diffs = [loss(method, seed) - loss(ref, seed) for seed in (0, 1)]
                keys.append((opt, method, ref, col))
                raw.append(float(stats.ttest_1samp(diffs, 0.0).pvalue))
    holm = dict(zip(keys, multipletests(raw, method="holm")[1], strict=True))
    assert "Holm over the 30 paired tests of this page" in md
    sgd_table = md.split("## sgd")[1].split("## adamw")[0]
    for start, ref in (("| min_norm |", "vanilla"), ("| min_norm minus random_rater |", "random_rater")):
        cells_md = next(x for x in sgd_table.splitlines() if x.startswith(start)).split("|")[2:5]
        for col, text in zip(("1", "2", "ema"), cells_md, strict=True):
            p_raw = raw[keys.index(("sgd", "min_norm", ref, col))]
            assert f"p {p_raw:.2g} ({holm['sgd', 'min_norm', ref, col]:.2g})" in text
    diff = sum(cells["sgd", "min_norm", s]["raw"]["1"] - cells["sgd", "random_rater", s]["raw"]["1"] for s in (0, 1)) / 2
    line = next(x for x in sgd_table.splitlines() if x.startswith("| min_norm minus random_rater |"))
    assert line.split("|")[2].strip().strip("*").startswith(f"{diff:+.3g} [")
    outputs = {name: (root / name).read_bytes() for name in ("ladder.md", "ladder.csv", "ladder.png")}
    stamps = {p: p.stat().st_mtime_ns for p in root.rglob("seed*.json")}

    second = invoke(*args)  # every cell reused, the same bytes
    assert second.exit_code == 0, (second.output, second.exception)
    assert "ladder: sgd" not in second.output and "starting" not in second.output
    assert {p: p.stat().st_mtime_ns for p in root.rglob("seed*.json")} == stamps
    assert {name: (root / name).read_bytes() for name in outputs} == outputs

    changed = invoke("ladder", *tiny_overrides, *RATER, *LADDER, "ladder.optimizers.sgd.lr=0.02")
    assert changed.exit_code == 2 and changed.stderr.strip().count("\n") == 0
    assert "ran with ladder.optimizer={'lr': 0.01" in changed.stderr

    # two processes share the cells out (each a run of one process): the same numbers
    shutil.rmtree(root)  # the stage-(i) checkpoint and the raters stay, reused
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "noisevalue.cli", "ladder", *tiny_overrides, *RATER, *LADDER,
                           "--nproc-per-node", "2"], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "18 to run, 9 here and the rest on 1 more processes" in proc.stdout
    assert (root / "ladder.csv").read_bytes() == outputs["ladder.csv"]
    for (opt, method, seed), cell in cells.items():
        again = json.loads((root / "cells" / opt / method / f"seed{seed}.json").read_text())
        assert (again["raw"], again["ema"]) == (cell["raw"], cell["ema"]), (opt, method, seed)


@pytest.mark.parametrize(("override", "message"), [
    ("ladder.methods.weighted={name: min_snr}", "ladder.methods.weighted.name: 'min_snr' is a loss weighting"),
    ("ladder.methods.top={name: oracle, params: {k: 0}}", "selector 'oracle': k must be an integer >= 1"),
    ("ladder.horizons=[2,1]", "horizons: [2, 1]: steps >= 1, increasing, each once"),
    ("ladder.optimizers.sgd={name: sgd, lr: 0}", "ladder.optimizers.sgd.lr: Input should be greater than 0"),
    ("eval.loss_draws=0", "eval.loss_draws: 0 turns the held-out loss off"),
    ("ladder.also_against={min_norm: nope}", "also_against: 'nope' is not one of the methods"),
])
def test_a_bad_ladder_setting_stops_with_one_line_before_anything_is_written(tmp_path, tiny_overrides, override,
                                                                               message):
    result = invoke("ladder", *tiny_overrides, *RATER, *LADDER, override)
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not (tmp_path / "run").exists()


def test_the_default_difference_between_methods_is_the_rater_against_its_untrained_self():
    from noisevalue.config import LadderConfig

    assert LadderConfig().also_against == {"rater": "random_rater"}
    # dropped with a method it names when not asked for; refused when asked for
    assert LadderConfig(methods={"vanilla": {"name": "random"}, "rater": {"name": "rater"}}).also_against == {}
    with pytest.raises(ValueError, match="also_against: 'rater' against itself"):
        LadderConfig(also_against={"rater": "rater"})


def test_a_cell_from_before_a_new_setting_is_reused_at_its_default(tmp_path):
    from noisevalue.errors import ConfigError
    from noisevalue.experiments import ladder

    path = tmp_path / "seed0.json"
    path.write_text(json.dumps({"raw": {}, "settings": {"train.lr": 0.01}}))
    now = {"train.lr": 0.01, "train.loss": "simple"}  # a key added to noisevalue after the cell ran
    assert ladder.reusable(path, now, {"train.loss": "simple"})
    with pytest.raises(ConfigError, match="train.loss"):
        ladder.reusable(path, {**now, "train.loss": "hybrid"}, {"train.loss": "simple"})
