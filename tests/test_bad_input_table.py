"""A careless user's mistakes, table-driven: every case must end with exactly one line on
stderr (``noisevalue: error: ...`` naming the culprit), exit code 2, and the directory
tree byte-for-byte as it was (nothing created, nothing lost, nothing half-written)."""

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from noisevalue.cli import app
from tests.conftest import TINY
from tests.test_no_pickle import crafted
from tests.test_protocol import META

runner = CliRunner()


def tree(root: Path) -> dict:
    """Every folder and file under ``root`` with its content's digest."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """What the cases point at: a finished run, a rater checkpoint, bad data, a file where a
    folder should be, a crafted pickle and a samples file."""
    root = tmp_path_factory.mktemp("world")
    run = root / "run"
    assert runner.invoke(app, ["run", *TINY, f"output_dir={run}"]).exit_code == 0
    rater = root / "rater"
    result = runner.invoke(app, ["run", *TINY, *META, "workflow=meta_train", f"meta.pretrained={run}",
                                 "meta.outer_steps=2", f"output_dir={rater}"])
    assert result.exit_code == 0, result.output
    (root / "afile").write_text("not a folder")
    (root / "empty").mkdir()
    images = root / "images" / "cat"
    images.mkdir(parents=True)
    for i in range(3):
        Image.fromarray(np.full((8, 8, 3), 40 * i, dtype=np.uint8)).save(images / f"{i}.png")
    (images / "3.png").write_bytes(b"\x89PNG not really")  # corrupt: opened before training
    evil, marker = crafted(root)
    np.savez(root / "samples.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    np.savez(root / "float.npz", arr_0=np.zeros((4, 8, 8, 3), dtype=np.float32))
    corrupt = shutil.copytree(run, root / "corrupt")  # a copy of the run with a truncated model file
    for model in corrupt.glob("checkpoints/step_*/model.safetensors"):
        model.write_bytes(model.read_bytes()[:200])
    nan = shutil.copytree(run, root / "nan")  # a run whose EMA weights are NaN
    from safetensors.torch import load_file, save_file

    for ema in nan.glob("checkpoints/step_*/ema.safetensors"):
        state = load_file(str(ema))
        save_file({k: torch.full_like(v, float("nan")) for k, v in state.items()}, str(ema))
    (root / "bad.yaml").write_text("train: [unclosed\n")
    (root / "list.yaml").write_text("- a\n- b\n")
    return {"root": root, "run": run, "rater": rater, "marker": marker, "evil": evil, "corrupt": corrupt, "nan": nan}


def RUN(*extra):
    return ["run", *TINY, "output_dir={root}/out", *extra]


def FOLDER(root):
    return ["~data.dataset.params", "~data.eval_dataset", "data.dataset.name=image_folder",
            f"data.dataset.params.root={root}", "data.dataset.params.image_size=8"]


CASES = [
    # ---- recipe keys, types and ranges
    ("unknown backbone", RUN("model.name=DiT-Q/2"), "model.name: unknown backbone 'DiT-Q/2'"),
    ("unknown encoder", RUN("data.encoder.name=jpeg"), "data.encoder.name: unknown encoder 'jpeg'"),
    ("misspelled key", RUN("train.stepz=3"), "train.stepz: unknown key"),
    ("steps not a number", RUN("train.steps=many"), "train.steps: Input should be a valid integer"),
    ("zero batch", RUN("train.global_batch_size=0"), "train.global_batch_size: Input should be greater than 0"),
    ("negative lr", RUN("train.lr=-1"), "train.lr"),
    ("unknown backbone parameter", RUN("model.params.hidden=3"), "model.params: unknown parameter 'hidden'"),
    ("backbone parameter of the wrong type", RUN("model.params.mlp_ratio=wide"), "model"),
    ("dropout out of range", RUN("model.params.class_dropout_prob=1.5"), "class_dropout_prob must be in [0, 1)"),
    ("unknown workflow", RUN("workflow=bogus"), "workflow"),
    ("unknown device", RUN("train.device=tpu"), "train.device"),
    ("bad divergence policy", RUN("train.nonfinite=maybe"), "train.nonfinite"),
    ("zero process-group timeout", RUN("train.dist_timeout=0"), "train.dist_timeout: Input should be greater than 0"),
    ("negative process-group timeout", RUN("train.dist_timeout=-5", "--nproc-per-node", "2"),
     "train.dist_timeout: Input should be greater than 0"),
    ("probe groups over the inner loops", RUN("workflow=protocol", "meta.subproblems=4", "meta.groups=16",
                                              "meta.val_batch_size=16", "meta.probe_groups=6"),
     "meta.probe_groups: 6 is not divisible by meta.subproblems (4)"),
    ("unknown loss weighting", RUN("train.loss_weighting.name=bogus"), "train.loss_weighting.name: unknown"),
    ("unknown timestep sampler", RUN("train.timestep_sampler.name=bogus"), "train.timestep_sampler.name: unknown"),
    ("meta engine mode", RUN("meta.optimizer.params.mode=bogus", "workflow=protocol"), "mode must be one of"),
    ("meta engine hvp", RUN("meta.optimizer.params.hvp=exact", "workflow=protocol"), "hvp must be one of"),
    ("rater mlp ratio", RUN("rater.params.mlp_ratio=0", "workflow=protocol"), "mlp_ratio must be > 0"),
    ("unknown rater", RUN("rater.name=bogus", "workflow=protocol"), "rater.name: unknown rater 'bogus'"),
    ("selector k", RUN("train.selector={name: max_norm, params: {k: 0}}"), "selector 'max_norm': k must be"),
    ("selector batch size", RUN("train.selector={name: rater, params: {k: 4, batch_size: 0}}"), "batch_size must be"),
    ("rater selector without rater", RUN("train.selector={name: rater, params: {k: 4}}"), "needs a trained rater"),
    ("unknown selector", RUN("train.selector.name=bogus"), "train.selector.name: unknown selector"),
    ("checkpointing with forward mode", RUN("workflow=protocol", "meta.activation_checkpointing=true",
                                            "meta.optimizer.params.mode=mixed"), "uses forward-mode AD"),
    ("bf16 meta with the math kernel", RUN("meta.precision=bf16"), "meta.precision: bf16 needs meta.attention: blocked"),
    ("bf16 meta with a fresh Adam", RUN("meta.precision=bf16", "meta.attention=blocked", "meta.inner_optimizer=adamw_fresh"),
     "with meta.inner_optimizer: adamw_fresh"),
    ("unknown meta attention", RUN("meta.attention=flash"), "meta.attention"),
    ("patch does not fit", RUN("data.dataset.params.image_size=9"), "not divisible by patch size 2"),
    # ---- overrides and recipe files
    ("empty override key", RUN("=5"), "override '=5': the key before '=' is empty"),
    ("override without value", RUN("train.steps"), "override 'train.steps': expected key=value"),
    ("removing a key that is not there", RUN("~train.nokey"), "'train.nokey' is not in the recipe"),
    ("missing recipe file", ["run", "{root}/nosuch.yaml"], "nosuch.yaml"),
    ("invalid YAML", ["run", "{root}/bad.yaml", "output_dir={root}/out"], "bad.yaml"),
    ("recipe that is a list", ["run", "{root}/list.yaml", "output_dir={root}/out"], "list.yaml"),
    ("validate a bad value", ["recipe", "validate", "digits", "train.steps=-3"], "train.steps"),
    ("validate crafted weights", ["recipe", "validate", "digits", "eval.evaluators=[{name: fid, params: "
                                  "{features: inception, weights_path: '{evil}'}}]"], "refused"),
    ("every missing file at once", RUN(*FOLDER("{root}/nowhere"), "data.encoder.name=sd_vae",
                                       "eval.evaluators=[{name: fid, params: {features: inception}}]"),
     "3 problems: data.dataset.params.root: folder"),
    ("validate a missing data folder", ["recipe", "validate", "digits", *FOLDER("{root}/nowhere")], "does not exist"),
    ("show a bad key", ["recipe", "show", "digits", "train.stepz=3"], "train.stepz: unknown key"),
    # ---- data and weights
    ("missing data folder", RUN(*FOLDER("{root}/nowhere")), "data.dataset.params.root: folder '{root}/nowhere'"),
    ("empty data folder", RUN(*FOLDER("{root}/empty")), "no images"),
    ("corrupt image", RUN(*FOLDER("{root}/images")), "cannot read image"),
    ("data folder is a file", RUN(*FOLDER("{root}/afile")), "data.dataset.params.root"),
    ("VAE weights unavailable", RUN("data.encoder.name=sd_vae"), "data.encoder.params.local_path: not set"),
    ("Inception weights unavailable", RUN("eval.evaluators=[{name: fid, params: {features: inception}}]"),
     "eval.evaluators.0.params.weights_path: not set"),
    ("crafted Inception weights", RUN("eval.evaluators=[{name: fid, params: {features: inception, "
                                      "weights_path: '{evil}'}}]"), "refused"),
    ("no validation data left", RUN("workflow=protocol", "meta.val_fraction=0.0001"), "meta.val_fraction"),
    # ---- devices, processes, outputs
    ("cuda without CUDA", RUN("train.device=cuda"), "train.device: 'cuda' requested but CUDA is not available"),
    ("batch not divisible by processes", RUN("--nproc-per-node", "3"), "not divisible by the 3 processes"),
    ("validate a batch not divisible by processes", ["recipe", "validate", *TINY, "--no-files", "--nproc-per-node", "3"],
     "train.global_batch_size: 8 is not divisible by the 3 processes"),
    ("cache a pixel-space recipe", ["cache", *TINY, "output_dir={root}/out"], "there is nothing to cache"),
    ("cache a missing data folder", ["cache", *TINY, "output_dir={root}/out", *FOLDER("{root}/nowhere"),
                                     "data.encoder.name=sd_vae"], "2 problems: data.encoder.params.local_path: not set"),
    ("zero processes", RUN("--nproc-per-node", "0"), "--nproc-per-node"),
    ("machines not a number", RUN("--nnodes", "two"), "--nnodes 'two'"),
    ("node rank out of range", RUN("--node-rank", "3"), "--node-rank 3"),
    ("unknown option", RUN("--bogus"), "No such option: --bogus"),
    ("output_dir is a file", ["run", *TINY, "output_dir={root}/afile"], "output_dir: '{root}/afile' is a file"),
    ("output_dir under a file", ["run", *TINY, "output_dir={root}/afile/run"], "'{root}/afile' is a file"),
    ("guidance without a null label", RUN("sample.cfg_scale=4", "model.params.class_dropout_prob=0"),
     "sample.cfg_scale: guidance"),
    # ---- checkpoints named by the recipe
    ("init_from missing", RUN("train.init_from={root}/nowhere"), "train.init_from: checkpoint"),
    ("init_from a rater", RUN("train.init_from={rater}"), "train.init_from: '{rater}"),
    ("init_from another backbone", RUN("train.init_from={run}", "model.params.learn_sigma=true"),
     "was written for backbone"),
    ("init_from truncated", RUN("train.init_from={corrupt}"), "corrupt or truncated"),
    ("pretrained missing", RUN(*META, "workflow=meta_train", "meta.pretrained={root}/nowhere"), "meta.pretrained"),
    ("pretrained a rater", RUN(*META, "workflow=meta_train", "meta.pretrained={rater}"), "is a rater checkpoint"),
    ("pretrained not given", RUN(*META, "workflow=meta_train"), "meta.pretrained: a diffusion checkpoint"),
    ("selector rater missing", RUN("train.selector={name: rater, params: {k: 2, checkpoint: '{root}/nowhere'}}"),
     "checkpoint"),
    ("selector rater is a diffusion checkpoint",
     RUN("train.selector={name: rater, params: {k: 2, checkpoint: '{run}'}}"), "not a rater checkpoint"),
    # ---- resume
    ("a second run into a finished one", ["run", *TINY, "output_dir={run}"], "already holds checkpoints"),
    ("resume without checkpoints", RUN("--resume"), "--resume: no checkpoint in"),
    ("resume a truncated checkpoint", ["run", *TINY, "output_dir={corrupt}", "--resume", "train.steps=6"],
     "corrupt or truncated"),
    ("resume with another seed", ["run", *TINY, "output_dir={run}", "--resume", "seed=3"], "--resume: seed was 0"),
    ("resume with another backbone, allowed", ["run", *TINY, "output_dir={run}", "--resume", "train.steps=6",
                                               "model.params.learn_sigma=true", "--allow-changes", "model.params"],
     "was written for backbone"),
    # ---- sample
    ("sample a missing run", ["sample", "{root}/nowhere"], "not found"),
    ("sample into a file", ["sample", "{run}", "--num", "2", "--out", "{root}/afile"], "--out: '{root}/afile' is a file"),
    ("sample zero images", ["sample", "{run}", "--num", "0", "--out", "{root}/s"], "--num"),
    ("sample a rater", ["sample", "{rater}", "--out", "{root}/s"], "is a rater checkpoint"),
    ("sample on cuda without CUDA", ["sample", "{run}", "--device", "cuda", "--out", "{root}/s"], "--device"),
    ("sample zero processes", ["sample", "{run}", "--nproc-per-node", "0"], "--nproc-per-node"),
    ("sample a class out of range", ["sample", "{run}", "--class", "99", "--out", "{root}/s"], "--class 99"),
    ("sample NaN weights", ["sample", "{nan}", "--num", "2", "--out", "{root}/s"], "holds non-finite values"),
    ("sample truncated weights", ["sample", "{corrupt}", "--num", "2", "--no-ema", "--out", "{root}/s"],
     "corrupt or truncated"),
    ("sample without a run argument", ["sample"], "Missing argument"),
    # ---- eval
    ("eval missing samples", ["eval", "{root}/nowhere.npz"], "not found"),
    ("eval without reference", ["eval", "{root}/samples.npz"], "--reference is required"),
    ("eval unknown evaluator", ["eval", "{root}/samples.npz", "--reference", "digits", "--evaluator", "bogus"],
     "unknown evaluator 'bogus'"),
    ("eval parameter without =", ["eval", "{root}/samples.npz", "--reference", "digits", "--param", "x"],
     "--param 'x': expected KEY=VALUE"),
    ("eval crafted weights", ["eval", "{root}/samples.npz", "--reference", "digits", "--metric", "fid",
                              "--weights", "{evil}"], "refused"),
    ("eval float images", ["eval", "{root}/float.npz", "--reference", "digits"], "uint8"),
    ("eval a NaN run", ["eval", "{nan}"], "holds non-finite values"),
    # ---- experiment commands
    ("ablate an unknown input", ["ablate", *TINY, "output_dir={root}/out", "--remove", "color"], "--remove color"),
    ("ablate into a file", ["ablate", *TINY, "output_dir={root}/afile", "--remove", "label"], "is a file"),
    ("transfer to an unknown backbone", ["transfer", *TINY, "output_dir={root}/out", "--to", "DiT-Q/2"],
     "--to: unknown backbone 'DiT-Q/2'"),
    ("transfer a missing rater", ["transfer", *TINY, "output_dir={root}/out", "--rater", "{root}/nowhere"],
     "no checkpoint found"),
    ("transfer a diffusion checkpoint as rater", ["transfer", *TINY, "output_dir={root}/out", "--rater", "{run}"],
     "not a rater checkpoint"),
    ("analyze a missing checkpoint", ["analyze", *TINY, "output_dir={root}/out", "--checkpoint", "{root}/nowhere"],
     "--checkpoint"),
    ("analyze a rater as diffusion checkpoint", ["analyze", *TINY, "output_dir={root}/out", "--checkpoint", "{rater}"],
     "is a rater checkpoint"),
    ("analyze a negative step", ["analyze", *TINY, "output_dir={root}/out", "--step", "-1"], "--step -1"),
    ("compare an unknown method", ["compare", *TINY, "output_dir={root}/out", "--method", "bogus"], "bogus"),
    ("experiment batch not divisible", ["ablate", *TINY, "output_dir={root}/out", "--nproc-per-node", "3"],
     "not divisible by the 3 processes"),
]


def test_there_are_enough_cases():
    assert len(CASES) >= 60 and len({name for name, _, _ in CASES}) == len(CASES)


@pytest.mark.parametrize("name, args, expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input(world, name, args, expected):
    fill = {k: str(v) for k, v in world.items()}
    args = [_fill(a, fill) for a in args]
    before = tree(world["root"])
    cwd = os.getcwd()
    os.chdir(world["root"])  # relative paths land in the tree under test too
    try:
        result = runner.invoke(app, args)
    finally:
        os.chdir(cwd)
    err = result.stderr.strip()
    assert result.exit_code == 2, (name, result.output, result.exception)
    assert err.count("\n") == 0, err
    assert err.startswith("noisevalue: error: "), err
    assert _fill(expected, fill) in err, err
    assert tree(world["root"]) == before, f"{name}: the directory tree changed"
    assert not world["marker"].exists()


def _fill(text: str, fill: dict) -> str:
    for key, value in fill.items():
        text = text.replace("{" + key + "}", value)
    return text


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes anywhere")
def test_read_only_output(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    try:
        result = runner.invoke(app, ["run", *TINY, f"output_dir={locked}/run"])
        assert result.exit_code == 2 and "is not writable" in result.stderr
        assert list(locked.iterdir()) == []
    finally:
        locked.chmod(0o755)
