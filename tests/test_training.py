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
    from tests.conftest import tiny_vae_and_images

    tiny_vae_and_images(tmp_path)
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


def fused_trainer(tmp_path, *extra):
    """A tiny digits trainer on the CUDA path, on the CPU: the fused AdamW, which skips a
    non-finite step itself (``found_inf``) so that no step reads the device's flag."""
    from noisevalue.config import load_recipe
    from noisevalue.distributed import DistInfo
    from noisevalue.train.diffusion_training import DiffusionTraining
    from tests.conftest import TINY

    recipe = load_recipe("digits", [*TINY, f"output_dir={tmp_path / 'run'}", *extra])
    trainer = DiffusionTraining(recipe, tmp_path / "run", DistInfo())
    trainer.setup()
    trainer.fused = True
    trainer.optimizer = torch.optim.AdamW([p for p in trainer.model.parameters() if p.requires_grad],
                                          lr=recipe.train.lr, fused=True)
    return trainer


def test_training_steps_read_nothing_back_between_logging_steps(tmp_path):
    import traceback

    from torch.overrides import TorchFunctionMode

    trainer = fused_trainer(tmp_path, "train.selector={name: max_norm, params: {k: 4}}")
    reads = [torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
             torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.numpy]
    found = []

    class HostReads(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if func in reads:
                frames = [f for f in traceback.extract_stack() if "noisevalue" in f.filename]
                found.append((func.__name__, frames[-1].filename.replace("\\", "/").rsplit("noisevalue/", 1)[-1]))
            return func(*args, **(kwargs or {}))

    with HostReads():
        for step in range(3):
            trainer.train_step(step)
    # the only values read are the data order's, a permutation that lives on the host
    assert found and {where for _, where in found} == {"train/batches.py"}, found
    with HostReads():
        trainer.check_finite(3)  # the logging step reads the window: the loop's one sync
    assert any(where == "train/diffusion_training.py" for _, where in found[3:])
    assert trainer.window_steps == 3 and trainer.window_loss > 0


def test_a_nonfinite_step_is_not_applied_and_is_decided_at_the_logging_step(tmp_path):
    from noisevalue.ema import unwrap

    trainer = fused_trainer(tmp_path, "train.nonfinite=skip", "train.max_skips=1")
    fetch = trainer.data.fetch

    def poisoned(indices, flip):  # step 1's images are NaN: its loss and gradient are
        x, y = fetch(indices, flip)
        return (x * float("nan"), y) if trainer.poison else (x, y)

    trainer.data.fetch = poisoned
    trainer.poison = False
    trainer.train_step(0)
    before = {k: v.clone() for k, v in unwrap(trainer.model).state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.state_dict().items()}
    trainer.poison = True
    trainer.train_step(1)
    assert all(torch.equal(v, before[k]) for k, v in unwrap(trainer.model).state_dict().items())
    assert all(torch.equal(v, ema_before[k]) for k, v in trainer.ema.state_dict().items())
    trainer.poison = False
    trainer.train_step(2)
    assert any(not torch.equal(v, before[k]) for k, v in unwrap(trainer.model).state_dict().items())
    trainer.check_finite(3)
    assert trainer.skipped == 1 and trainer.window_steps == 2  # the bad step is neither applied nor averaged


def test_a_rank_draws_only_its_rows_and_candidate_j_does_not_depend_on_k():
    from noisevalue.train.batches import draw_noise, draw_step

    full = draw_step(0, 5, 12, (1, 8, 8), 1000, 0.1, True, k=4)
    part = draw_step(0, 5, 12, (1, 8, 8), 1000, 0.1, True, k=4, rows=(4, 8))
    for name in ("t", "noise", "drop", "flip"):
        assert torch.equal(getattr(part, name), getattr(full, name)[4:8]), name
    vanilla = draw_step(0, 5, 12, (1, 8, 8), 1000, 0.1, True, k=1)
    assert torch.equal(vanilla.noise[:, 0], full.noise[:, 0])  # vanilla trains on candidate 0 of the pool
    assert not torch.equal(full.noise[:, 0], full.noise[:, 1])
    odd = (3, 5, 5)  # 75 values: not a multiple of the 16 that torch.randn fills at a time
    assert torch.equal(draw_noise(0, 5, 0, 3, odd, 1)[:, 0], draw_noise(0, 5, 0, 3, odd, 3)[:, 0])


@pytest.mark.slow
def test_an_evaluation_on_two_and_three_processes_equals_one_process(tmp_path, tiny_overrides):
    """The same weights (no training step) evaluated by 1, 2 and 3 gloo processes: 40 samples
    in blocks of 16 and 150 held-out items in blocks of 64 leave uneven last shards."""
    base = [o for o in tiny_overrides if not o.startswith(("output_dir", "eval.evaluators"))] + [
        "train.steps=0", "train.global_batch_size=12", "eval.num_samples=40", "sample.batch_size=16", "eval.loss_images=150",
        "eval.baselines=true"]

    def run(name, n, cache):
        env = dict(os.environ, OMP_NUM_THREADS="1", NOISEVALUE_CACHE=str(tmp_path / cache))
        proc = subprocess.run([sys.executable, "-m", "noisevalue.cli", "run", *base, f"output_dir={tmp_path / name}",
                               "--nproc-per-node", str(n)], capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return json.loads((tmp_path / name / "metrics.json").read_text())["metrics"], proc.stdout

    one, said = run("one", 1, "cache1")
    assert {"heldout_loss", "fd_digits", "kid_digits", "baseline_train_images/fd_digits"} <= set(one)
    assert "reference statistics: computed from 40 images" in said  # eval.num_samples of the held-out digits
    grid = (tmp_path / "one" / "samples" / "step_0000000.png").read_bytes()
    for n in (2, 3):  # each computes the reference statistics itself, shared by its processes
        metrics, _ = run(f"n{n}", n, f"cache{n}")
        assert metrics.keys() == one.keys()
        for key, value in one.items():
            assert metrics[key] == pytest.approx(value, rel=1e-6, abs=0), (n, key)
        assert (tmp_path / f"n{n}" / "samples" / "step_0000000.png").read_bytes() == grid
    again, said = run("again", 2, "cache1")  # a later run reuses the cached reference statistics
    assert "reference statistics: cache hit" in said and again == pytest.approx(one, rel=1e-6, abs=0)


def test_every_method_of_a_seed_sees_the_same_images_timesteps_and_pool_and_vanilla_trains_on_candidate_0(tmp_path):
    """Paired by construction, end to end: the trainer of vanilla (``random``, k=1) and of
    min-norm selection (k=4) feed the loss the same images and timesteps at every step, and
    the noise each trains on is candidate 0 (vanilla) and the smallest candidate (min-norm)
    of one and the same pool, the one ``draw_noise`` gives for that seed and step."""
    from noisevalue.config import load_recipe
    from noisevalue.distributed import DistInfo
    from noisevalue.train.batches import draw_noise
    from noisevalue.train.diffusion_training import DiffusionTraining
    from tests.conftest import TINY

    def fed(name: str, selector: str) -> list[tuple]:
        recipe = load_recipe("digits", [*TINY, f"output_dir={tmp_path / name}", "seed=3",
                                        f"train.selector={{name: {selector}}}"])
        trainer = DiffusionTraining(recipe, tmp_path / name, DistInfo())
        trainer.setup()
        seen = []
        loss = trainer.diffusion.per_sample_loss

        def spy(model, x0, t, y, noise, t_cond=None, hybrid=False):
            seen.append((x0.clone(), t.clone(), noise.clone()))
            return loss(model, x0, t, y, noise, t_cond, hybrid=hybrid)

        trainer.diffusion.per_sample_loss = spy  # type: ignore[method-assign]
        for step in range(3):
            trainer.train_step(step)
        return seen

    vanilla, min_norm = fed("vanilla", "random"), fed("min_norm", "min_norm")
    for step, ((x_v, t_v, n_v), (x_m, t_m, n_m)) in enumerate(zip(vanilla, min_norm, strict=True)):
        assert torch.equal(x_v, x_m) and torch.equal(t_v, t_m)
        pool = draw_noise(3, step, 0, 8, (1, 8, 8), k=4)
        assert torch.equal(n_v, pool[:, 0])
        smallest = pool.flatten(2).norm(dim=2).argmin(dim=1)
        assert torch.equal(n_m, pool[torch.arange(8), smallest])
        assert not torch.equal(n_v, n_m)
