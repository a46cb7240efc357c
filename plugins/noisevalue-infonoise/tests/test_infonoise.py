"""InfoNoise: inverse-CDF sampling against a closed form, the refresh's arithmetic, exact
resume, and one-line errors."""

import math

import pytest
import torch
from noisevalue_infonoise import InfoNoise, plot_density
from safetensors.torch import load_file
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app
from noisevalue.diffusion import Diffusion

T = 1000


def bound(sampler, weight=None):
    d = Diffusion()
    sampler.bind(d.alphas_cumprod, torch.ones(T, dtype=torch.float64) if weight is None else weight)
    return sampler


def test_inverse_cdf_reproduces_a_known_density():
    """Kolmogorov-Smirnov: 20,000 draws from p(t) ∝ (t + 1)^2 at a fixed seed against the
    closed-form CDF of that distribution."""
    sampler = bound(InfoNoise())
    p = (torch.arange(T, dtype=torch.float64) + 1) ** 2
    sampler.state["probs"] = p / p.sum()
    u = torch.rand(20000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    drawn = sampler.resample(torch.zeros(20000, dtype=torch.long), u)
    n = torch.arange(1, T + 1, dtype=torch.float64)
    closed = n * (n + 1) * (2 * n + 1) / 6 / (T * (T + 1) * (2 * T + 1) / 6)  # sum of squares
    empirical = torch.bincount(drawn, minlength=T).cumsum(0).double() / len(drawn)
    ks = float((empirical - closed).abs().max())
    assert ks < 1.36 / math.sqrt(len(drawn))  # the 5% critical value
    # and the uniform start draws every timestep equally
    start = bound(InfoNoise()).resample(torch.zeros(4, dtype=torch.long), torch.tensor([0.0, 0.25, 0.5, 0.9999]))
    assert start.tolist() == [0, 250, 500, 999]


def test_a_refresh_turns_the_loss_profile_into_the_training_distribution():
    """No EMA history, no smoothing, a far gate, no floor: the distribution per timestep is
    profile(bin) / weight(t) x |d lambda / d t|, normalised."""
    weight = torch.linspace(0.5, 2.0, T, dtype=torch.float64)
    sampler = bound(InfoNoise(bins=8, refresh_every=2, smooth=0, gate=100.0, floor=0.0), weight)
    t = torch.arange(T)
    losses = (t.double() / T) ** 2 + 0.1  # a known eps-MSE profile
    stats = sampler.statistics(t, losses)
    sampler.update(stats, 1)  # no refresh yet: still uniform
    assert torch.equal(sampler.state["probs"], torch.full((T,), 1.0 / T, dtype=torch.float64))
    sampler.update(stats, 2)
    b = sampler.bin_of_t
    mean = torch.zeros(8, dtype=torch.float64).index_add_(0, b, losses) / torch.bincount(b, minlength=8)
    gate = torch.sigmoid((100.0 - sampler.centers) / 1.0)
    lam = torch.log(Diffusion().alphas_cumprod / (1 - Diffusion().alphas_cumprod))
    width = torch.gradient(lam)[0].abs()
    expected = (mean * gate)[b] / weight * width
    torch.testing.assert_close(sampler.state["probs"], expected / expected.sum(), rtol=1e-12, atol=0)
    assert len(sampler.state["history"]) == 1 and float(sampler.state["history_steps"][0]) == 2.0
    density = sampler.state["history"][0]  # integrates to 1 over log-SNR
    assert float((density * (sampler.edges[1:] - sampler.edges[:-1])).sum()) == pytest.approx(1.0, rel=1e-12)


def test_the_gate_and_the_floor():
    sampler = bound(InfoNoise(bins=16, refresh_every=1, smooth=0, gate=0.0, gate_width=0.5, floor=0.1))
    t = torch.arange(T)
    sampler.update(sampler.statistics(t, torch.ones(T)), 1)
    probs = sampler.state["probs"]
    high_snr = sampler.lam > 4  # gated off: only the floor's share is left
    assert float(probs[high_snr].max()) == pytest.approx(0.1 / T, rel=0.05)
    assert float(probs.min()) >= 0.1 / T * (1 - 1e-12)


def test_resume_is_exact(tmp_path):
    from tests.conftest import TINY

    runner = CliRunner()
    sampler = "train.timestep_sampler={name: infonoise, params: {bins: 8, refresh_every: 2}}"
    common = [*TINY, "train.steps=7", "train.ckpt_every=3", sampler]  # refreshes fall between checkpoints
    whole = runner.invoke(app, ["run", *common, f"output_dir={tmp_path / 'whole'}"])
    assert whole.exit_code == 0, (whole.output, whole.exception)
    part = runner.invoke(app, ["run", *common, "train.steps=3", f"output_dir={tmp_path / 'part'}"])
    assert part.exit_code == 0
    (tmp_path / "part" / "recipe.yaml").unlink()  # resume with the longer budget
    resumed = runner.invoke(app, ["run", *common, f"output_dir={tmp_path / 'part'}", "--resume"])
    assert resumed.exit_code == 0, (resumed.output, resumed.exception)
    a = tmp_path / "whole" / "checkpoints" / "step_0000007"
    b = tmp_path / "part" / "checkpoints" / "step_0000007"
    for group in ("model", "ema", "timestep_sampler"):
        x, y = load_file(str(a / f"{group}.safetensors")), load_file(str(b / f"{group}.safetensors"))
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), group
    state = load_file(str(a / "timestep_sampler.safetensors"))
    assert state["history_steps"].tolist() == [2.0, 4.0, 6.0]
    assert not torch.allclose(state["probs"], torch.full_like(state["probs"], 1 / T))  # it adapted
    png = plot_density(tmp_path / "whole")
    assert png.is_file() and png.stat().st_size > 1000


@pytest.mark.parametrize("params, message", [
    ({"bins": 1}, "bins must be an integer >= 2, got 1"),
    ({"ema": 1.0}, "ema must be in [0.0, 1.0), got 1.0"),
    ({"floor": -0.1}, "floor must be in [0.0, 1.0], got -0.1"),
])
def test_bad_options_are_one_line_errors(params, message):
    assert registry.get("timestep_sampler", "infonoise") is InfoNoise
    inner = ", ".join(f"{k}: {v}" for k, v in params.items())
    result = CliRunner().invoke(app, ["recipe", "validate", "digits", f"train.timestep_sampler={{name: infonoise, params: {{{inner}}}}}"])
    assert result.exit_code == 2 and message in result.stderr and result.stderr.strip().count("\n") == 0


def test_infonoise_is_a_method_for_compare(tmp_path):
    import json

    from tests.conftest import TINY

    args = [*TINY, f"output_dir={tmp_path}", "select.steps=4", "select.eval_every=4",
            "select.methods.infonoise={name: infonoise, params: {bins: 8, refresh_every: 2}}", "--method", "infonoise"]
    result = CliRunner().invoke(app, ["compare", *args])
    assert result.exit_code == 0, (result.output, result.exception)
    stage = json.loads((tmp_path / "select" / "infonoise" / "stage.json").read_text())
    assert stage["train.timestep_sampler.name"] == "infonoise" and stage["train.selector.params"] == {"k": 1}
    wall = (tmp_path / "compare_timings.md").read_text().split("Wall time")[1]
    assert "| infonoise | timestep sampler |" in wall
