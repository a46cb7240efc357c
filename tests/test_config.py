"""Recipe loading: overrides, interpolation, and one-line errors that name the path."""

import pytest

from noisevalue.config import builtin_recipe_names, check_components, load_recipe
from noisevalue.errors import ConfigError, PluginError


def test_default_recipe_and_interpolation():
    r = load_recipe()
    assert r.name == "digits"
    assert r.output_dir == "runs/digits"
    assert r.model.name == "DiT-Tiny/2"


def test_dotlist_overrides_and_deletion():
    r = load_recipe("digits", ["train.steps=7", "name=other", "model.name=DiT-S/2", "~model.params.learn_sigma"])
    assert r.train.steps == 7
    assert r.output_dir == "runs/other"  # interpolation sees the override
    assert r.model.name == "DiT-S/2"
    assert "learn_sigma" not in r.model.params


@pytest.mark.parametrize("name", ["digits", "digits32", "imagenet_cond", "imagenet_uncond", "ffhq_uncond"])
def test_builtin_recipes_validate(name):
    r = load_recipe(name)
    check_components(r)


def test_paper_recipes_use_dit_settings():
    r = load_recipe("imagenet_cond")
    assert (r.model.name, r.train.lr, r.train.weight_decay, r.train.global_batch_size) == ("DiT-S/2", 1e-4, 0.0, 256)
    assert r.train.ema_decay == 0.9999 and r.sample.cfg_scale == 1.25
    assert r.data.encoder.params["scale_factor"] == 0.18215
    assert set(builtin_recipe_names()) >= {"digits", "imagenet_cond", "imagenet_uncond", "ffhq_uncond"}


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.lrr=1", "train.lrr: unknown key"),
        ("train.steps=abc", "train.steps: Input should be a valid integer"),
        ("train.lr=-1", "train.lr: Input should be greater than 0"),
        ("train.ema_decay=1.5", "train.ema_decay: Input should be less than 1"),
        ("diffusion.beta_end=0.00001", "diffusion: Value error, beta_end must be greater than beta_start"),
        ("train.device=tpu", "train.device: Input should be 'auto', 'cpu' or 'cuda'"),
    ],
)
def test_bad_values_name_the_path(override, expected):
    with pytest.raises(ConfigError) as info:
        load_recipe("digits", [override])
    msg = str(info.value)
    assert expected in msg
    assert "\n" not in msg


def test_unknown_component_lists_known_names():
    r = load_recipe("digits", ["model.name=DiT-Q/2"])
    with pytest.raises(PluginError, match=r"model.name: unknown backbone 'DiT-Q/2'; known backbone names: .*DiT-S/2"):
        check_components(r)


def test_unknown_component_parameter():
    r = load_recipe("digits", ["model.params.depthh=3"])
    with pytest.raises(ConfigError, match=r"model.params: unknown parameter 'depthh' for backbone 'DiT-Tiny/2'"):
        check_components(r)


def test_missing_recipe_file_and_bad_override(tmp_path, monkeypatch):
    with pytest.raises(ConfigError, match="no such file"):
        load_recipe("nope.yaml")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "digits32").mkdir()  # a run folder named like a built-in recipe does not hide it
    assert load_recipe("digits32").name == "digits32"
    (tmp_path / "runs").mkdir()
    with pytest.raises(ConfigError, match=r"recipe 'runs': a folder, not a recipe file \(a YAML file, or a built-in"):
        load_recipe("runs")
    (tmp_path / "digits").write_text("name: mine\n")  # a file of that name wins (the built-in is complete)
    with pytest.raises(ConfigError, match=r"^digits: data: required field is missing"):
        load_recipe("digits")
    with pytest.raises(ConfigError, match="expected key=value"):
        load_recipe("digits", ["train.steps"])
    with pytest.raises(ConfigError, match="not in the recipe"):
        load_recipe("digits", ["~train.nothing"])


def test_precision_and_compile_default_to_fast_on_cuda_only(monkeypatch):
    import torch

    from noisevalue.config import load_recipe

    cpu = load_recipe("imagenet_cond").train
    assert (cpu.precision, cpu.compile) == ("fp32", False)  # no CUDA here (or forced below)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    for name in ("digits", "imagenet_cond", "ffhq_uncond"):
        gpu = load_recipe(name).train
        assert (gpu.precision, gpu.compile) == ("bf16", True), name
    pinned = load_recipe("imagenet_cond", ["train.precision=fp32", "train.compile=false"]).train
    assert (pinned.precision, pinned.compile) == ("fp32", False)
    on_cpu = load_recipe("digits", ["train.device=cpu"]).train
    assert (on_cpu.precision, on_cpu.compile) == ("fp32", False)


def test_recipe_show_keeps_auto_precision_and_compile_for_the_copy(monkeypatch):
    """``recipe show NAME > my.yaml`` on a CPU node: the copy keeps auto (bf16, compiled on
    the GPUs it runs on), and says what auto means here; a value the recipe sets is kept."""
    import torch
    import yaml
    from typer.testing import CliRunner

    from noisevalue.cli import app

    runner = CliRunner()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a CPU node
    result = runner.invoke(app, ["recipe", "show", "imagenet_cond"])
    assert result.exit_code == 0, result.output
    shown = yaml.safe_load(result.output)
    assert (shown["train"]["precision"], shown["train"]["compile"]) == ("auto", "auto")
    assert "so precision fp32 and compile false" in result.output.splitlines()[-1]  # what auto means here
    pinned = runner.invoke(app, ["recipe", "show", "imagenet_cond", "train.precision=fp32", "train.compile=true"])
    assert pinned.exit_code == 0
    train = yaml.safe_load(pinned.output)["train"]
    assert (train["precision"], train["compile"]) == ("fp32", True)
    explicit = runner.invoke(app, ["recipe", "show", "imagenet_cond", "train.precision=auto", "train.compile=auto"])
    assert yaml.safe_load(explicit.output)["train"]["precision"] == "auto"
    # the copy, read on a GPU node, resolves auto there: bf16 and compiled
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    from noisevalue.config import parse_recipe

    gpu = parse_recipe(shown).train
    assert (gpu.precision, gpu.compile) == ("bf16", True)
