"""``noisevalue export``: the diffusers pipeline draws what ``noisevalue sample`` draws, the
official-layout file holds the weights, and what cannot be exported is refused in one line."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, DiTPipeline
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from noisevalue.backbones import dit
from noisevalue.backbones.diffusers_dit import ReferenceDiTTransformer2DModel
from noisevalue.backbones.dit_formats import to_diffusers
from noisevalue.cli import app
from noisevalue.data.encoders import VAEEncoder
from noisevalue.diffusion import Diffusion, ddim_sample, ddim_scheduler, guided_eps
from noisevalue.train.batches import STREAM_SAMPLES, image_generators, seeded_generator
from noisevalue.train.build import image_to_unit

runner = CliRunner()


def randomise(state: dict[str, torch.Tensor], seed: int = 0) -> dict[str, torch.Tensor]:
    """Every weight but the frozen position embedding moved, so the model's output matters
    (a few steps from adaLN-Zero leave it near zero)."""
    g = torch.Generator().manual_seed(seed)
    return {k: v if k == "pos_embed" else v + 0.05 * torch.randn(v.shape, generator=g) for k, v in state.items()}


@pytest.fixture(scope="module")
def latent_run(tmp_path_factory):
    """A 4-step run on a tiny random VAE's latents (2 classes), its EMA weights randomised."""
    from tests.conftest import TINY, tiny_vae_and_images

    root = tmp_path_factory.mktemp("latent")
    tiny_vae_and_images(root)
    run = root / "run"
    result = runner.invoke(app, [
        "run", *TINY, f"output_dir={run}", "~data.dataset.params", "~data.eval_dataset",
        "data.dataset.name=image_folder", f"data.dataset.params.root={root / 'images'}",
        "data.dataset.params.image_size=16", "data.encoder.name=sd_vae",
        f"data.encoder.params.local_path={root / 'vae'}", "data.num_workers=1", "sample.eta=0",
    ])
    assert result.exit_code == 0, result.output
    step = run / "checkpoints" / "step_0000004"
    save_file(randomise(load_file(str(step / "ema.safetensors"))), str(step / "ema.safetensors"))
    return run


def test_the_diffusers_pipeline_draws_what_sample_draws(latent_run, tmp_path):
    from noisevalue.sampling import sample as sp

    out = tmp_path / "pipe"
    result = runner.invoke(app, ["export", str(latent_run), str(out), "--format", "diffusers"])
    assert result.exit_code == 0, result.output
    assert "DiTPipeline.from_pretrained" in result.output
    settings = sp.sample_settings(sp.resolve_run(latent_run), num=3, steps=5, cfg_scale=1.0, eta=0.0)
    sampler = sp.Sampler(settings, torch.device("cpu"))
    from noisevalue.train.evaluate import Sampling, draw_images

    labels = settings.labels(0, 3)
    ours = draw_images(sampler.model, sampler.diffusion, sampler.encoder, tuple(settings.latent_shape), 2, labels,
                       image_generators(settings.seed, 0, 3), Sampling(5, 0.0, 1.0), torch.device("cpu"))
    pipe = DiTPipeline.from_pretrained(out)
    assert type(pipe.transformer) is ReferenceDiTTransformer2DModel  # the run's DiT: reference numerics
    assert pipe.labels == {"cat": 0, "dog": 1}  # the image folder's classes
    assert pipe.get_label_ids(["dog"]) == [1]
    for i in range(3):
        theirs = pipe(class_labels=[int(labels[i])], guidance_scale=1.0, num_inference_steps=5, output_type="pt",
                      generator=seeded_generator(settings.seed, i, STREAM_SAMPLES)).images
        torch.testing.assert_close(theirs[0], ours[i], atol=1e-4, rtol=0)
    assert ours.std() > 1e-2  # images, not a constant


def test_the_official_layout_file_holds_the_ema_weights(latent_run, tmp_path):
    out = tmp_path / "dit.pt"
    result = runner.invoke(app, ["export", str(latent_run), str(out), "--format", "dit"])
    assert result.exit_code == 0, result.output
    saved = torch.load(out, weights_only=True)
    ema = load_file(str(latent_run / "checkpoints" / "step_0000004" / "ema.safetensors"))
    assert set(saved) == set(ema) and all(torch.equal(saved[k], v) for k, v in ema.items())


def test_guidance_through_the_pipeline_is_ours_for_1000_classes():
    """DiTPipeline's null class is 1000: with ImageNet's class count its guidance (on every
    latent channel) is exactly ours."""
    torch.manual_seed(0)
    model = dit.DiT(input_size=4, patch_size=2, in_channels=4, hidden_size=32, depth=1, num_heads=2,
                    num_classes=1000).eval()
    model.load_state_dict(randomise(model.state_dict(), seed=1))
    config, state = to_diffusers(model)
    transformer = ReferenceDiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    transformer.load_state_dict(state)
    vae = AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(32,), down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=32,
                        layers_per_block=1, scaling_factor=0.18215).eval()
    diffusion = Diffusion()
    scheduler = ddim_scheduler(diffusion)
    pipe = DiTPipeline(transformer=transformer.eval(), vae=vae, scheduler=scheduler)
    theirs = pipe(class_labels=[3, 999], guidance_scale=4.0, num_inference_steps=4, output_type="pt",
                  generator=torch.Generator().manual_seed(7)).images
    noise = torch.randn((2, 4, 4, 4), generator=torch.Generator().manual_seed(7))
    eps = guided_eps(model, 1000, torch.tensor([3, 999]), 4.0)
    ours = image_to_unit(VAEEncoder.from_vae(vae, scale_factor=0.18215).decode(
        ddim_sample(eps, diffusion, noise, num_steps=4)))
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_what_cannot_be_exported_is_refused_before_anything_is_written(latent_run, tmp_path):
    from tests.conftest import TINY

    digits = tmp_path / "digits"
    assert runner.invoke(app, ["run", *TINY, f"output_dir={digits}", "train.steps=2"]).exit_code == 0
    cases = [
        (["export", str(digits), str(tmp_path / "a")], "is not a VAE", tmp_path / "a"),
        (["export", str(latent_run), str(tmp_path / "b"), "--format", "onnx"], "--format: expected one of", tmp_path / "b"),
        (["export", str(latent_run), str(digits)], "exists already", None),
        (["export", str(tmp_path / "nowhere"), str(tmp_path / "c")], "not found", tmp_path / "c"),
    ]
    for args, message, never in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and len(result.output.strip().splitlines()) == 1, result.output
        assert never is None or not never.exists()
    assert not list(tmp_path.glob(".*"))  # no temporary folder left behind
