"""End-to-end training on the digits default at a tiny size: artefacts, exact resume, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from noisevalue.cli import app

runner = CliRunner()


def cli(*args):
    return runner.invoke(app, [str(a) for a in args])


def tensors(run: Path, step: int, name: str):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / f"{name}.safetensors"))


def test_run_writes_checkpoint_events_grid_and_metrics(tmp_path, tiny_overrides):
    overrides = [o for o in tiny_overrides if not o.startswith("eval.evaluators")]
    result = cli("run", *overrides, "eval.num_samples=20", "eval.baselines=false")
    assert result.exit_code == 0, result.output + str(result.exception)
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000004"
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    grid = run / "samples" / "step_0000004.png"
    from PIL import Image

    # 10 classes x 1 column of 8x8 digits, enlarged 4x, with 1-pixel padding
    assert Image.open(grid).size == (1 * 33 + 1, 10 * 33 + 1)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["step"] == 4 and metrics["metrics"]["fd_digits"] > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/images_per_sec", "eval/fd_digits"} <= tags
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("output_dir")]
    full, split = tmp_path / "full", tmp_path / "split"
    assert cli("run", *base, f"output_dir={full}").exit_code == 0
    assert cli("run", *base, "train.steps=2", f"output_dir={split}").exit_code == 0
    resumed = cli("run", *base, f"output_dir={split}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    for name in ("model", "ema", "optimizer"):
        a, b = tensors(full, 4, name), tensors(split, 4, name)
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), (name, key)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_whole_batch(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("output_dir")] + ["train.steps=3", "train.ckpt_every=3"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, n in (("one", 1), ("two", 2)):
        proc = subprocess.run(
            [sys.executable, "-m", "noisevalue.cli", "run", *base, f"output_dir={tmp_path / name}",
             "--nproc-per-node", str(n)],
            capture_output=True, text=True, env=env, timeout=300,
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = tensors(tmp_path / "one", 3, "model"), tensors(tmp_path / "two", 3, "model")
    start = tensors(tmp_path / "one", 3, "ema")  # differs from model: training moved it
    moved = 0
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)
        moved += int(not torch.equal(one[key], start[key]))
    assert moved > 0


def test_latent_pipeline_with_a_local_vae_and_image_folder(tmp_path, tiny_overrides):
    """Image folder -> tiny random AutoencoderKL (local copy) -> latent cache -> DiT -> decode."""
    import numpy as np
    from diffusers import AutoencoderKL
    from PIL import Image

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=32, layers_per_block=1, sample_size=16,
    )
    vae.save_pretrained(tmp_path / "vae")
    rng = np.random.default_rng(0)
    for cls in ("cat", "dog"):
        (tmp_path / "images" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "images" / cls / f"{i}.png")
    overrides = [
        *tiny_overrides, "~data.dataset.params", "~data.eval_dataset",
        "data.dataset.name=image_folder", f"data.dataset.params.root={tmp_path / 'images'}",
        "data.dataset.params.image_size=16", "data.random_flip=true", "data.cache_shard_size=5",
        "data.encoder.name=sd_vae", f"data.encoder.params.local_path={tmp_path / 'vae'}", "data.num_workers=1",
    ]
    result = CliRunner().invoke(app, ["run", *overrides])
    assert result.exit_code == 0, (result.output, result.exception)
    run = tmp_path / "run"
    meta = json.loads((run / "checkpoints" / "step_0000004" / "meta.json").read_text())
    assert meta["latent_shape"] == [4, 8, 8] and meta["num_classes"] == 2
    assert meta["backbone"]["params"]["in_channels"] == 4
    assert len(list((run / "latents").glob("*.safetensors"))) == 3  # 12 images, shards of 5
    from PIL import Image as PILImage

    assert PILImage.open(run / "samples" / "step_0000004.png").size == (1 * 33 + 1, 2 * 33 + 1)


def test_selection_with_k1_reproduces_vanilla_training_exactly(tmp_path, tiny_overrides):
    base = [o for o in tiny_overrides if not o.startswith("output_dir")]
    assert cli("run", *base, f"output_dir={tmp_path / 'vanilla'}").exit_code == 0
    for name in ("max_norm", "min_norm"):
        result = cli("run", *base, f"output_dir={tmp_path / name}", f"train.selector={{name: {name}, params: {{k: 1}}}}")
        assert result.exit_code == 0, result.output
        a, b = tensors(tmp_path / "vanilla", 4, "model"), tensors(tmp_path / name, 4, "model")
        assert all(torch.equal(a[k], b[k]) for k in a)
    # with k=4 the max-norm selector trains on other noises: the weights differ
    assert cli("run", *base, f"output_dir={tmp_path / 'k4'}", "train.selector={name: max_norm, params: {k: 4}}").exit_code == 0
    a, b = tensors(tmp_path / "vanilla", 4, "model"), tensors(tmp_path / "k4", 4, "model")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_evaluation_prepares_once_and_reuses_baselines(tmp_path, monkeypatch):
    from noisevalue.config import load_recipe
    from noisevalue.data.digits import DigitsDataset
    from noisevalue.data.encoders import IdentityEncoder
    from noisevalue.diffusion import Diffusion
    from noisevalue.distributed import DistInfo
    from noisevalue.train.evaluate import Evaluation

    monkeypatch.setenv("NOISEVALUE_CACHE", str(tmp_path))

    class MeanEvaluator:
        prepared = 0

        def prepare(self, reference):
            MeanEvaluator.prepared += 1
            self.ref = torch.cat(list(reference)).mean().item()

        def evaluate(self, generated):
            return {"gap": abs(torch.cat(list(generated)).mean().item() - self.ref)}

        def reference_key(self):
            return None  # keeps no statistics: prepared from the images, once per run

    recipe = load_recipe("digits", ["eval.num_samples=50", "eval.loss_draws=0"])
    evaluation = Evaluation(recipe, [MeanEvaluator()], DistInfo(), IdentityEncoder(), (1, 8, 8), 10, Diffusion(),
                            DigitsDataset(split="train"))
    evaluation.generated = lambda model: iter([torch.full((10, 1, 8, 8), 0.9)])
    first = evaluation.metrics(None)
    evaluation.generated = lambda model: iter([torch.full((10, 1, 8, 8), 0.65)])
    second = evaluation.metrics(None)  # both above the mean digit
    assert MeanEvaluator.prepared == 1
    assert first["baseline_train_images/gap"] == second["baseline_train_images/gap"]
    assert first["gap"] - second["gap"] == pytest.approx(0.25)
    # the shuffled-pixel baseline keeps the pixel values: the same mean as the real images
    assert first["baseline_shuffled_pixels/gap"] == pytest.approx(first["baseline_train_images/gap"], abs=1e-6)


def test_an_evaluation_lost_to_a_kill_is_redone_on_resume(tmp_path, tiny_overrides):
    """A kill after the checkpoint of step 2 was published but before its evaluation: the
    resumed run evaluates step 2 first, so metrics.json and the grids equal the
    uninterrupted run's."""
    import json
    import shutil

    base = [o for o in tiny_overrides if not o.startswith("output_dir")] + ["eval.every=2", "train.ckpt_every=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert cli("run", *base, f"output_dir={full}").exit_code == 0
    shutil.copytree(full, killed)
    # the state the kill leaves: the step-2 checkpoint is the newest, its evaluation is missing
    shutil.rmtree(killed / "checkpoints" / "step_0000004")
    (killed / "checkpoints" / "latest").write_text("step_0000002\n")
    metrics = json.loads((killed / "metrics.json").read_text())
    metrics["history"] = [h for h in metrics["history"] if h["step"] < 2]
    (killed / "metrics.json").write_text(json.dumps(metrics))
    for grid in (killed / "samples").glob("step_000000[24].png"):
        grid.unlink()
    resumed = cli("run", *base, f"output_dir={killed}", "--resume")
    assert resumed.exit_code == 0, resumed.output
    assert json.loads((killed / "metrics.json").read_text()) == json.loads((full / "metrics.json").read_text())
    for step in (2, 4):
        name = f"step_{step:07d}.png"
        assert (killed / "samples" / name).read_bytes() == (full / "samples" / name).read_bytes()
