"""Noise Awareness Guidance: the seeded null-time mask, the guidance formula, w = 0 equal to
plain sampling bit for bit, and one-line errors."""

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app
from noisevalue.diffusion import guided_eps
from noisevalue.interfaces import NULL_TIMESTEP

runner = CliRunner()


@pytest.fixture
def tiny_overrides(tmp_path):
    from tests.conftest import TINY

    return [*TINY, f"output_dir={tmp_path / 'run'}"]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def perturbed(seed=0):
    torch.manual_seed(seed)
    model = registry.create("backbone", "NAG-DiT-Tiny/2", learn_sigma=False).eval()
    with torch.no_grad():  # leave adaLN-Zero's all-zero output
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    return model


def test_the_null_time_replaces_only_the_time_embedding():
    model = perturbed()
    t = torch.tensor([NULL_TIMESTEP, 10, NULL_TIMESTEP, 900])
    c = model.embed_time(t)
    assert torch.equal(c[0], model.null_time) and torch.equal(c[2], model.null_time)
    plain = model.t_embedder(t.clamp_min(0))  # the same batch: the same rounding
    assert torch.equal(c[1], plain[1]) and torch.equal(c[3], plain[3]) and not torch.equal(c[0], plain[0])


def test_guidance_is_the_closed_form_alone_and_with_cfg():
    model = perturbed()
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 400, 999]), torch.tensor([1, 2, 10])
    null_t = torch.full_like(t, NULL_TIMESTEP)
    with torch.no_grad():
        cond, no_time = model(x, t, y)[:, :1], model(x, null_t, y)[:, :1]
        uncond = model(x, t, torch.full_like(y, 10))[:, :1]
        assert torch.equal(guided_eps(model, 10, y, 1.0, nag_scale=0.0)(x, t), cond)
        torch.testing.assert_close(guided_eps(model, 10, y, 1.0, nag_scale=2.0)(x, t), cond + 2.0 * (cond - no_time))
        both = guided_eps(model, 10, y, 1.5, nag_scale=2.0)(x, t)
        torch.testing.assert_close(both, uncond + 1.5 * (cond - uncond) + 2.0 * (cond - no_time))


def test_the_training_mask_is_seeded_and_only_the_condition_is_dropped(tiny_overrides, tmp_path):
    from noisevalue.config import load_recipe
    from noisevalue.distributed import init
    from noisevalue.train.batches import STREAM_TIME_DROP, draw_step, seeded_generator
    from noisevalue.train.diffusion_training import DiffusionTraining

    recipe = load_recipe(None, [*tiny_overrides, "model.name=NAG-DiT-Tiny/2",
                                "model.params.time_dropout_prob=0.5", "train.global_batch_size=64"])
    seen = []
    for run in ("a", "b"):
        trainer = DiffusionTraining(recipe, tmp_path / run, init("cpu"))
        trainer.setup()
        calls: list[torch.Tensor] = []
        trainer.model.register_forward_pre_hook(lambda _m, args, calls=calls: calls.append(args[1].clone()))
        trainer.train_step(3)
        seen.append(calls[0])
        trainer.cleanup()
    assert torch.equal(seen[0], seen[1])  # the same mask in another process or run
    drop = torch.rand(64, generator=seeded_generator(recipe.seed, 3, STREAM_TIME_DROP)) < 0.5
    t = draw_step(recipe.seed, 3, 64, (1, 8, 8), 1000, 0.1, recipe.data.random_flip).t
    assert torch.equal(seen[0], torch.where(drop, torch.full_like(t, NULL_TIMESTEP), t))
    assert 0 < int(drop.sum()) < 64


def test_w_zero_samples_exactly_like_plain_sampling(tiny_overrides, tmp_path):
    out = tmp_path / "run"
    assert invoke("run", *tiny_overrides, "model.name=NAG-DiT-Tiny/2").exit_code == 0
    draws = {}
    for label, extra in (("plain", []), ("zero", ["--nag-scale", "0"]), ("two", ["--nag-scale", "2"])):
        result = invoke("sample", out, "--num", 8, "--steps", 2, "--out", tmp_path / label, *extra)
        assert result.exit_code == 0, (result.output, result.exception)
        with np.load(tmp_path / label / "samples.npz") as f:
            draws[label] = f["arr_0"]
    assert np.array_equal(draws["plain"], draws["zero"])
    assert not np.array_equal(draws["plain"], draws["two"])


def test_bad_input_is_one_line_and_exit_code_2(tiny_overrides, tmp_path):
    bad = invoke("recipe", "validate", "digits", "sample.nag_scale=2")
    assert bad.exit_code == 2 and "sample.nag_scale: Noise Awareness Guidance (2) needs a backbone" in bad.stderr
    for command in (["recipe", "validate", "digits"], ["run", *tiny_overrides]):  # built on the meta device
        bad = invoke(*command, "model.name=NAG-DiT-Tiny/2", "model.params.time_dropout_prob=1.5")
        assert bad.exit_code == 2 and "time_dropout_prob must be in (0, 1), got 1.5" in bad.stderr
        assert "train " not in bad.output  # before any training step
    out = tmp_path / "run"
    assert invoke("run", *tiny_overrides).exit_code == 0
    bad = invoke("sample", out, "--num", 4, "--nag-scale", 2)
    assert bad.exit_code == 2 and bad.stderr.strip().count("\n") == 0
    assert "--nag-scale 2: Noise Awareness Guidance needs a model trained with a null time" in bad.stderr
    assert registry.accepted("backbone", "NAG-DiT-S/2") >= {"time_dropout_prob", "class_dropout_prob"}


@pytest.mark.parametrize("name", ["NAG-DiT-S/2", "NAG-DiT-XL/2"])
def test_the_paper_sizes_are_registered(name):
    factory = registry.get("backbone", name)
    assert factory.__doc__.startswith(name)
