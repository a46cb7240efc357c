"""Every mistake a user can make: one line on stderr, exit code 2, nothing on disk lost."""

import hashlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noisevalue.cli import app

runner = CliRunner()


def fails_cleanly(args, expected):
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 2, (result.output, result.exception)
    err = result.stderr.strip()
    assert err.count("\n") == 0, err
    assert err.startswith("noisevalue: error: ")
    assert expected in err, err
    return err


def digest(folder: Path) -> dict:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*")) if p.is_file()
    }


@pytest.mark.parametrize(
    "override, expected",
    [
        ("model.name=DiT-Q/2", "model.name: unknown backbone 'DiT-Q/2'; known backbone names:"),
        ("data.encoder.name=jpeg", "data.encoder.name: unknown encoder 'jpeg'"),
        ("train.stepz=3", "train.stepz: unknown key"),
        ("train.steps=many", "train.steps: Input should be a valid integer"),
        ("train.global_batch_size=0", "train.global_batch_size: Input should be greater than 0"),
        ("model.params.hidden=3", "model.params: unknown parameter 'hidden' for backbone 'DiT-Tiny/2'"),
        # values, not only names: cheap components are built once before any training
        ("meta.optimizer.params.mode=bogus",
         "meta.optimizer (unrolled): Unrolled: mode must be one of ('reverse', 'mixed'), got 'bogus'"),
        ("meta.optimizer.params.hvp=exact", "meta.optimizer (unrolled): Unrolled: hvp must be one of"),
        ("train.selector={name: max_norm, params: {k: 0}}", "train.selector (max_norm): selector 'max_norm': k must be"),
        ("train.selector={name: rater, params: {k: 4, batch_size: 0}}",
         "train.selector (rater): selector 'rater': batch_size must be an integer >= 1 or null"),
        # a selector that needs a rater, where nothing hands it one, is refused before training
        ("train.selector={name: rater, params: {k: 4}}",
         "train.selector.params.checkpoint: selector 'rater' needs a trained rater; give a rater checkpoint"),
    ],
)
def test_recipe_errors(tiny_overrides, override, expected):
    fails_cleanly(["run", *tiny_overrides, override], expected)
    fails_cleanly(["recipe", "validate", "digits", override], expected)


def test_activation_checkpointing_needs_a_reverse_mode_engine(tiny_overrides):
    for command in (["run", *tiny_overrides, "workflow=protocol"], ["recipe", "validate", "digits"]):
        fails_cleanly([*command, "meta.activation_checkpointing=true", "meta.optimizer.params.mode=mixed"],
                      "meta.activation_checkpointing: meta.optimizer 'unrolled' {'mode': 'mixed'} uses forward-mode AD")


def test_recipe_validate_accepts_good_recipes():
    result = runner.invoke(app, ["recipe", "validate", "imagenet_cond", "--no-files"])
    assert result.exit_code == 0 and "ok" in result.output


@pytest.mark.parametrize("pinned", [[], ["meta.subproblems=16"]], ids=["subproblems as the recipe says", "16"])
def test_recipe_validate_checks_the_process_count_of_the_launch_options(pinned):
    """The launch options of run: every global batch is checked against their process
    count, with --no-files too (the check needs no files)."""
    fails_cleanly(["recipe", "validate", "imagenet_cond", *pinned, "--no-files", "--nproc-per-node", "3"],
                  "train.global_batch_size: 256 is not divisible by the 3 processes")
    for launch, processes in ((["--nproc-per-node", "8", "--nnodes", "2"], 16), (["--nproc-per-node", "8"], 8),
                              ([], 1)):
        result = runner.invoke(app, ["recipe", "validate", "imagenet_cond", *pinned, "--no-files", *launch])
        assert result.exit_code == 0, (launch, result.output, result.stderr)
        assert f"processes {processes})" in result.output
    fails_cleanly(["recipe", "validate", "imagenet_cond", *pinned, "--no-files", "--nnodes", "two"], "--nnodes 'two'")
    fails_cleanly(["recipe", "validate", "imagenet_cond", *pinned, "--no-files", "--nnodes", "2", "--node-rank", "2"],
                  "--node-rank 2: expected 0 .. 1 for --nnodes 2")


def test_recipe_validate_checks_the_meta_batches_against_the_processes():
    fails_cleanly(["recipe", "validate", "imagenet_cond", "meta.subproblems=16", "--no-files",
                   "--nproc-per-node", "8", "--nnodes", "4"], "meta.subproblems: 16 is not divisible by the 32 processes")
    fails_cleanly(["recipe", "validate", "imagenet_cond", "meta.subproblems=null", "meta.groups=24", "--no-files",
                   "--nproc-per-node", "16"], "meta.groups: 24 is not divisible by meta.subproblems (16)")


def test_recipe_validate_with_files_checks_the_process_count(tiny_overrides):
    fails_cleanly(["recipe", "validate", *tiny_overrides, "--nproc-per-node", "3"],
                  "train.global_batch_size: 8 is not divisible by the 3 processes")
    result = runner.invoke(app, ["recipe", "validate", *tiny_overrides, "--nproc-per-node", "2", "--nnodes", "2"])
    assert result.exit_code == 0 and "ok (recipe and files;" in result.output and "processes 4)" in result.output


def image_folder(root):
    return ["~data.dataset.params", "~data.eval_dataset", "data.dataset.name=image_folder",
            f"data.dataset.params.root={root}", "data.dataset.params.image_size=8"]


def test_missing_and_empty_data_folder(tmp_path, tiny_overrides):
    missing = tmp_path / "nowhere"
    fails_cleanly(["run", *tiny_overrides, *image_folder(missing)], "data.dataset.params.root: folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    fails_cleanly(["run", *tiny_overrides, *image_folder(empty)], "no images")


def test_image_size_that_does_not_fit_the_patch(tiny_overrides):
    fails_cleanly(["run", *tiny_overrides, "data.dataset.params.image_size=9"], "not divisible by patch size 2")


def test_batch_not_divisible_by_processes_is_a_recipe_error(tiny_overrides):
    from noisevalue.errors import ConfigError
    from noisevalue.train.batches import local_batch_size

    with pytest.raises(ConfigError, match="train.global_batch_size: 8 is not divisible by the 3 processes"):
        local_batch_size(8, 3)


@pytest.fixture
def finished_run(tmp_path, tiny_overrides):
    result = runner.invoke(app, ["run", *tiny_overrides])
    assert result.exit_code == 0, result.output
    return tmp_path / "run"


def test_checkpoint_problems(finished_run, tiny_overrides):
    before = digest(finished_run)
    # a second run into the same folder must not clobber it
    fails_cleanly(["run", *tiny_overrides], "already holds checkpoints")
    # another backbone: the resume check names the change
    fails_cleanly(["run", *tiny_overrides, "--resume", "train.steps=6", "model.params.learn_sigma=true"],
                  "--resume: model.params was")
    assert digest(finished_run) == before

    # accepted on purpose, the checkpoint itself refuses the other backbone
    fails_cleanly(["run", *tiny_overrides, "--resume", "train.steps=6", "model.params.learn_sigma=true",
                   "--allow-changes", "model.params"], "was written for backbone")
    assert digest(finished_run) == before

    # a truncated checkpoint file: found before anything is written
    model = finished_run / "checkpoints" / "step_0000004" / "model.safetensors"
    model.write_bytes(model.read_bytes()[:100])
    before = digest(finished_run)
    fails_cleanly(["run", *tiny_overrides, "--resume", "train.steps=6"], "corrupt or truncated")
    assert digest(finished_run) == before


def test_resume_without_checkpoint(tiny_overrides):
    fails_cleanly(["run", *tiny_overrides, "--resume"], "--resume: no checkpoint in")


def test_vae_weights_unavailable_offline(tiny_overrides):
    err = fails_cleanly(["run", *tiny_overrides, "data.encoder.name=sd_vae"], "data.encoder.params.local_path: not set")
    assert "(sd_vae)" in err


def test_inception_weights_unavailable(tmp_path, tiny_overrides):
    err = fails_cleanly(
        ["run", *tiny_overrides, "eval.evaluators=[{name: fid, params: {features: inception}}]"],
        "eval.evaluators.0.params.weights_path: not set",
    )
    assert "weights-inception-2015-12-05-6726825d.pth" in err
    assert not (tmp_path / "run" / "checkpoints").exists()  # failed before training


def test_network_values_are_checked_on_the_meta_device(tiny_overrides, tmp_path):
    for command in (["recipe", "validate", "digits"], ["run", *tiny_overrides]):
        fails_cleanly([*command, "model.params.class_dropout_prob=1.5"], "class_dropout_prob must be in [0, 1), got 1.5")
        fails_cleanly([*command, "rater.params.mlp_ratio=0", "workflow=protocol"], "mlp_ratio must be > 0, got 0")
    assert not (tmp_path / "run").exists()


def test_resume_refuses_a_changed_recipe_unless_allowed(tiny_overrides, tmp_path):
    run = tmp_path / "run"
    assert runner.invoke(app, ["run", *tiny_overrides, "train.steps=2"]).exit_code == 0
    before = digest(run)
    err = fails_cleanly(["run", *tiny_overrides, "train.steps=4", "train.lr=0.5", "seed=3", "--resume"],
                        "--resume: seed was 0 when this run started, the recipe now says 3 (and 1 more: train.lr)")
    assert "--allow-changes seed" in err and digest(run) == before
    # the budget, speed and logging settings are free; named keys are accepted on purpose
    ok = runner.invoke(app, ["run", *tiny_overrides, "train.steps=4", "train.log_every=2", "train.threads=2",
                             "train.lr=0.002", "--resume", "--allow-changes", "train.lr"])
    assert ok.exit_code == 0, ok.output
    import json

    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["optimizer"]["param_groups"][0]["lr"] == 0.002  # the accepted learning rate, not the saved one
