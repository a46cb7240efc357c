"""DiT weights in the official and diffusers layouts: conversions checked against diffusers'
own DiTTransformer2DModel output, safe reading, one-line errors."""

from __future__ import annotations

import argparse

import pytest
import torch
from diffusers import DiTTransformer2DModel

from noisevalue.backbones import dit
from noisevalue.backbones.dit_formats import (
    diffusers_folder,
    from_diffusers,
    read_diffusers,
    read_official,
    to_diffusers,
)
from noisevalue.errors import CheckpointError
from tests.conftest import CodeRunsIfUnpickled

# a tiny diffusers DiT: 2 blocks, 2 heads of 16, 8x8 latents with 4 channels, 10 classes
TINY = dict(num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=8, num_layers=2,
            sample_size=8, patch_size=2, num_embeds_ada_norm=10)


def tiny_diffusers(**overrides) -> DiTTransformer2DModel:
    torch.manual_seed(0)
    model = DiTTransformer2DModel(**{**TINY, **overrides}).eval()
    with torch.no_grad():  # diffusers zero-initialises nothing, but make every weight matter
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
        for block in model.transformer_blocks[1:]:  # one embedder, copied into every block
            block.norm1.emb.load_state_dict(model.transformer_blocks[0].norm1.emb.state_dict())
    return model


def inputs(n=6, c=4, size=8, classes=10):
    g = torch.Generator().manual_seed(3)
    return (torch.randn(n, c, size, size, generator=g), torch.randint(0, 1000, (n,), generator=g),
            torch.randint(0, classes + 1, (n,), generator=g))  # the null label included


def ours_from(model: DiTTransformer2DModel) -> dit.DiT:
    kwargs, state = from_diffusers(dict(model.config), model.state_dict())
    mine = dit.DiT(**kwargs).eval()
    mine.load_state_dict(state, strict=True)
    return mine


@pytest.mark.parametrize("norm_eps", [1e-5, 1e-6])
def test_from_diffusers_computes_what_diffusers_computes(norm_eps):
    theirs = tiny_diffusers(norm_eps=norm_eps)
    mine = ours_from(theirs)
    x, t, y = inputs()
    with torch.no_grad():
        expected = theirs(x, timestep=t, class_labels=y).sample
        got = mine(x, t, y)
    assert got.shape == expected.shape == (6, 8, 8, 8)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert expected.abs().mean() > 1e-2  # a real output, not two zeros


def test_the_numerics_are_what_makes_it_exact():
    """Built with the reference DiT's timestep frequencies, the same weights give another
    function: the conversion's time_freq_shift=1 is needed, not cosmetic."""
    theirs = tiny_diffusers()
    kwargs, state = from_diffusers(dict(theirs.config), theirs.state_dict())
    reference = dit.DiT(**{**kwargs, "time_freq_shift": 0}).eval()
    reference.load_state_dict(state)
    x, t, y = inputs()
    with torch.no_grad():
        gap = (reference(x, t, y) - theirs(x, timestep=t, class_labels=y).sample).abs().max()
    assert gap > 1e-4


def perturbed(model: dit.DiT, seed: int) -> dit.DiT:
    """``model`` with every weight but the frozen position embedding moved off its init
    (adaLN-Zero starts at a zero output), so every weight matters."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name != "pos_embed":
                p.add_(0.02 * torch.randn_like(p))
    return model


def tiny_dit(seed: int = 1, **numerics) -> dit.DiT:
    """A 2-block DiT on 8x8x4 latents with 10 classes, perturbed."""
    model = dit.DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10, **numerics)
    return perturbed(model, seed).eval()


def assert_same_outputs(cls, config: dict, state: dict, mine: dit.DiT) -> None:
    """diffusers' class ``cls`` built from ``config`` with ``state`` computes ``mine`` to 1e-5."""
    theirs = cls(**{k: v for k, v in config.items() if not k.startswith("_")}).eval()
    theirs.load_state_dict(state, strict=True)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(theirs(x, timestep=t, class_labels=y).sample, mine(x, t, y), atol=1e-5, rtol=0)


def test_to_diffusers_round_trip_and_output():
    mine = tiny_dit(time_freq_shift=1, mlp_norm_eps=1e-6)
    config, state = to_diffusers(mine)
    assert_same_outputs(DiTTransformer2DModel, config, state, mine)
    # and back: the same tensors, every one
    kwargs, back = from_diffusers(config, state)
    assert kwargs["time_freq_shift"] == 1 and kwargs["mlp_norm_eps"] == 1e-6 and kwargs["learn_sigma"]
    own = mine.state_dict()
    assert set(back) == set(own)
    for key, value in own.items():
        torch.testing.assert_close(back[key], value, atol=1e-7, rtol=0, msg=key)


def test_a_reference_dit_goes_to_the_subclass_with_its_timestep_features():
    from noisevalue.backbones.diffusers_dit import ReferenceDiTTransformer2DModel

    mine = tiny_dit(seed=2)  # the reference numerics, as every recipe's DiT by default
    config, state = to_diffusers(mine)
    assert config["_class_name"] == "ReferenceDiTTransformer2DModel" and config["norm_eps"] == 1e-6
    assert_same_outputs(ReferenceDiTTransformer2DModel, config, state, mine)
    kwargs, _ = from_diffusers(config, state)
    assert kwargs["time_freq_shift"] == 0 and kwargs["mlp_norm_eps"] == 1e-6


def test_to_diffusers_refuses_an_unconditional_dit():
    with pytest.raises(CheckpointError, match="unconditional"):
        to_diffusers(dit.DiT_Tiny_2(num_classes=0))


def test_a_saved_folder_is_read(tmp_path):
    theirs = tiny_diffusers()
    theirs.save_pretrained(tmp_path / "pipe" / "transformer")
    assert diffusers_folder(tmp_path / "pipe") == tmp_path / "pipe" / "transformer"
    assert diffusers_folder(tmp_path) is None
    kwargs, state = read_diffusers(tmp_path / "pipe")
    mine = dit.DiT(**kwargs).eval()
    mine.load_state_dict(state)
    x, t, y = inputs()
    with torch.no_grad():
        torch.testing.assert_close(mine(x, t, y), theirs(x, timestep=t, class_labels=y).sample, atol=1e-5, rtol=0)


def test_diffusers_errors_name_the_key():
    theirs = tiny_diffusers()
    config, state = dict(theirs.config), dict(theirs.state_dict())
    missing = dict(state)
    del missing["transformer_blocks.1.attn1.to_k.weight"]
    with pytest.raises(CheckpointError, match=r"'transformer_blocks\.1\.attn1\.to_k\.weight' is missing"):
        from_diffusers(config, missing)
    extra = {**state, "transformer_blocks.0.norm2.weight": torch.ones(32)}
    with pytest.raises(CheckpointError, match=r"'transformer_blocks\.0\.norm2\.weight' has no place"):
        from_diffusers(config, extra)
    apart = dict(state)
    key = "transformer_blocks.1.norm1.emb.timestep_embedder.linear_1.bias"
    apart[key] = apart[key] + 1
    with pytest.raises(CheckpointError, match="differs from block 0's copy"):
        from_diffusers(config, apart)
    with pytest.raises(CheckpointError, match="'activation_fn' is 'geglu'"):
        from_diffusers({**config, "activation_fn": "geglu"}, state)


def test_official_files_are_read_safely(tmp_path):
    model = dit.DiT_Tiny_2()
    plain = tmp_path / "plain.pt"
    torch.save(model.state_dict(), plain)
    state = read_official(plain)
    assert set(state) == set(model.state_dict())
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    # a dict holding model and ema: the ema, as the official sampler reads it
    ema = {k: v + 1 for k, v in model.state_dict().items()}
    both = tmp_path / "both.pt"
    torch.save({"model": model.state_dict(), "ema": ema}, both)
    assert torch.equal(read_official(both)["pos_embed"], ema["pos_embed"])
    # the official trainer's checkpoint also holds its argparse Namespace: refused, one line
    trainer = tmp_path / "0400000.pt"
    torch.save({"model": model.state_dict(), "args": argparse.Namespace(lr=1e-4)}, trainer)
    with pytest.raises(CheckpointError) as err:
        read_official(trainer)
    assert "holds Python objects" in str(err.value) and "\n" not in str(err.value)
    # nothing in a crafted file runs
    marker = tmp_path / "CODE_RAN"
    crafted = tmp_path / "crafted.pt"
    torch.save({"pos_embed": torch.zeros(1), "trap": CodeRunsIfUnpickled(str(marker))}, crafted)
    with pytest.raises(CheckpointError, match="holds Python objects"):
        read_official(crafted)
    assert not marker.exists()
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a torch file")
    with pytest.raises(CheckpointError, match="not a readable torch file"):
        read_official(junk)


# ------------------------------------------------------------------ train.init_from
def digits_model(**numerics) -> dit.DiT:
    """The digits default's backbone (DiT-Tiny/2, 8x8x1, 10 classes), every weight random."""
    return perturbed(dit.DiT_Tiny_2(class_dropout_prob=0.1, learn_sigma=False, **numerics), seed=5)


def started_from(tmp_path, source, *extra):
    """A 2-step run from ``source`` at lr 1e-30, which moves no float32 weight: its step-2
    weights are the ones it started from."""
    from typer.testing import CliRunner

    from noisevalue.cli import app
    from tests.conftest import TINY

    run = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", *TINY, f"output_dir={run}", "train.steps=2", "train.lr=1e-30",
                                      "train.weight_decay=0", f"train.init_from={source}", *extra])
    return result, run / "checkpoints" / "step_0000002"


def test_init_from_an_official_file_and_a_diffusers_folder(tmp_path):
    from safetensors.torch import load_file

    official = digits_model()
    torch.save(official.state_dict(), tmp_path / "official.pt")
    result, step = started_from(tmp_path / "a", tmp_path / "official.pt")
    assert result.exit_code == 0, result.output
    for group in ("model", "ema"):
        saved = load_file(str(step / f"{group}.safetensors"))
        assert all(torch.equal(saved[k], v) for k, v in official.state_dict().items()), group
    # a run started from such weights resumes (its origin is step 0, not the file's)
    from typer.testing import CliRunner

    from noisevalue.cli import app
    from tests.conftest import TINY

    resumed = CliRunner().invoke(app, ["run", *TINY, f"output_dir={tmp_path / 'a' / 'run'}", "train.steps=4",
                                       "train.lr=1e-30", "train.weight_decay=0",
                                       f"train.init_from={tmp_path / 'official.pt'}", "--resume",
                                       "--allow-changes", "train.steps"])
    assert resumed.exit_code == 0, resumed.output
    assert (step.parent / "step_0000004" / "model.safetensors").is_file()

    shifted = digits_model(time_freq_shift=1, mlp_norm_eps=1e-5)
    config, state = to_diffusers(shifted)
    theirs = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(state)
    theirs.save_pretrained(tmp_path / "hub")
    # the recipe's DiT has the reference numerics: one line saying what to set, nothing written
    result, _ = started_from(tmp_path / "b", tmp_path / "hub")
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "set model.params.time_freq_shift=1 model.params.mlp_norm_eps=1e-05" in result.output
    assert not (tmp_path / "b").exists()
    result, step = started_from(tmp_path / "c", tmp_path / "hub", "model.params.time_freq_shift=1",
                                "model.params.mlp_norm_eps=1e-5")
    assert result.exit_code == 0, result.output
    saved = load_file(str(step / "model.safetensors"))
    for key, value in shifted.state_dict().items():
        torch.testing.assert_close(saved[key], value, atol=1e-7, rtol=0, msg=key)


def test_init_from_weights_of_another_shape_names_the_key(tmp_path):
    torch.save(dit.DiT_Tiny_B_2(learn_sigma=False).state_dict(), tmp_path / "wide.pt")
    result, _ = started_from(tmp_path / "a", tmp_path / "wide.pt")
    assert result.exit_code == 2 and "\n" not in result.output.strip()
    assert "train.init_from" in result.output and "'pos_embed' has shape (1, 16, 192)" in result.output
    assert not (tmp_path / "a").exists()


def test_the_numerics_keywords_are_checked():
    from noisevalue.errors import ConfigError

    with pytest.raises(ConfigError, match="time_freq_shift must be 0 .* or 1"):
        dit.DiT_Tiny_2(time_freq_shift=2)
    with pytest.raises(ConfigError, match="mlp_norm_eps must be a number > 0"):
        dit.DiT_Tiny_2(mlp_norm_eps=0)


def test_sample_draws_foreign_weights_as_it_draws_a_run_started_from_them(tmp_path):
    """``noisevalue sample FILE --recipe digits`` (and a diffusers folder) gives exactly the
    images of a run whose weights are those of the file."""
    import numpy as np
    from typer.testing import CliRunner

    from noisevalue.cli import app

    runner = CliRunner()
    official = digits_model()
    torch.save(official.state_dict(), tmp_path / "official.pt")
    shifted = digits_model(time_freq_shift=1, mlp_norm_eps=1e-5)
    config, state = to_diffusers(shifted)
    theirs = DiTTransformer2DModel(**{k: v for k, v in config.items() if not k.startswith("_")})
    theirs.load_state_dict(state)
    theirs.save_pretrained(tmp_path / "hub")
    draw = ["--num", "4", "--steps", "2", "--cfg-scale", "1.5"]
    for source, numerics in ((tmp_path / "official.pt", []),
                             (tmp_path / "hub", ["model.params.time_freq_shift=1", "model.params.mlp_norm_eps=1e-5"])):
        result, _ = started_from(tmp_path / source.stem, source, *numerics)
        assert result.exit_code == 0, result.output
        ran = runner.invoke(app, ["sample", str(tmp_path / source.stem / "run"), *draw, "--out", str(tmp_path / "a")])
        assert ran.exit_code == 0, ran.output
        direct = runner.invoke(app, ["sample", str(source), "--recipe", "digits", *draw, "--out", str(tmp_path / "b")])
        assert direct.exit_code == 0, direct.output
        a, b = (np.load(tmp_path / d / "samples.npz") for d in ("a", "b"))
        assert np.array_equal(a["arr_0"], b["arr_0"]) and np.array_equal(a["arr_1"], b["arr_1"]), source
        assert a["arr_0"].std() > 1  # images, not a constant
        for d in ("a", "b"):
            import shutil

            shutil.rmtree(tmp_path / d)
    alone = runner.invoke(app, ["sample", str(tmp_path / "official.pt"), *draw])
    assert alone.exit_code == 2 and "pass --recipe RECIPE" in alone.output
    assert len(alone.output.strip().splitlines()) == 1
