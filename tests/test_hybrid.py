"""DiT's hybrid loss (L_simple + L_vlb) and DDPM sampling with the learned variance, against
closed forms and diffusers' own variance types."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.diffusion import Diffusion, ddpm_sample
from tests.conftest import TINY


@pytest.fixture(scope="module")
def diffusion() -> Diffusion:
    return Diffusion()


def noised(diffusion: Diffusion, t: torch.Tensor, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand(len(t), 2, 4, 4, generator=g, dtype=torch.float64) * 2 - 1
    noise = torch.randn(x0.shape, generator=g, dtype=torch.float64)
    return x0, noise, diffusion.q_sample(x0, t, noise)


def test_the_bound_term_is_zero_for_the_true_noise_and_the_posterior_variance(diffusion):
    t = torch.tensor([1, 10, 500, 999])
    x0, noise, x_t = noised(diffusion, t)
    out = torch.cat([noise, -torch.ones_like(noise)], dim=1)  # v = -1: the posterior's variance
    assert diffusion.vlb_terms(out, x0, x_t, t).abs().max() < 1e-9


def test_the_bound_term_is_the_gaussian_kl_in_bits(diffusion):
    t = torch.tensor([3, 40, 700])
    x0, noise, x_t = noised(diffusion, t, seed=1)
    g = torch.Generator().manual_seed(2)
    eps = noise + 0.3 * torch.randn(noise.shape, generator=g)
    v = torch.rand(noise.shape, generator=g) * 2 - 1
    got = diffusion.vlb_terms(torch.cat([eps, v], dim=1).double(), x0.double(), x_t.double(), t)
    # independently: the posterior and the model's Gaussian from the schedule, KL by torch.distributions
    a = diffusion.alphas_cumprod
    for i, step in enumerate(t.tolist()):
        ab, ab_prev = a[step], a[step - 1]
        beta = 1 - ab / ab_prev
        var = beta * (1 - ab_prev) / (1 - ab)
        c0, ct = beta * ab_prev.sqrt() / (1 - ab), (1 - ab_prev) * (1 - beta).sqrt() / (1 - ab)
        true_mean = c0 * x0[i].double() + ct * x_t[i].double()
        pred_x0 = (x_t[i].double() - (1 - ab).sqrt() * eps[i].double()) / ab.sqrt()
        frac = (v[i].double() + 1) / 2
        model_var = torch.exp(frac * torch.log(beta) + (1 - frac) * torch.log(var))
        kl = torch.distributions.kl_divergence(torch.distributions.Normal(true_mean, var.sqrt()),
                                               torch.distributions.Normal(c0 * pred_x0 + ct * x_t[i].double(),
                                                                          model_var.sqrt()))
        assert float(got[i]) == pytest.approx(float(kl.mean()) / math.log(2), rel=1e-9)


def test_at_t0_the_bound_term_is_the_decoder_nll(diffusion):
    t = torch.tensor([0, 0])
    x0, noise, x_t = noised(diffusion, t, seed=3)
    x0 = (x0 * 127.5).round() / 127.5  # on the 256 levels the decoder's bins are centred on
    out = torch.cat([noise + 0.05, torch.zeros_like(noise)], dim=1)
    got = diffusion.vlb_terms(out.double(), x0.double(), x_t.double(), t)
    # exactly: the mass of each value's bin (edge bins open) under the model's Gaussian
    var = (1 - diffusion.alphas_cumprod[1] / diffusion.alphas_cumprod[0])  # beta_1
    post = var * (1 - diffusion.alphas_cumprod[0]) / (1 - diffusion.alphas_cumprod[1])
    log_var = 0.5 * torch.log(1 - diffusion.alphas_cumprod[0]) + 0.5 * torch.log(post)  # frac 1/2
    ab = diffusion.alphas_cumprod[0]
    pred_x0 = (x_t.double() - (1 - ab).sqrt() * out[:, :2].double()) / ab.sqrt()
    normal = torch.distributions.Normal(pred_x0, torch.exp(0.5 * log_var))  # the posterior mean at t = 0 is x0's
    upper = torch.where(x0 > 0.999, torch.ones_like(pred_x0), normal.cdf(x0.double() + 1 / 255))
    lower = torch.where(x0 < -0.999, torch.zeros_like(pred_x0), normal.cdf(x0.double() - 1 / 255))
    exact = -torch.log((upper - lower).clamp(min=1e-12)).flatten(1).mean(1) / math.log(2)
    torch.testing.assert_close(got, exact, rtol=2e-3, atol=0)  # the decoder's tanh approximation of the cdf


def test_each_half_of_the_hybrid_loss_trains_its_own_channels(diffusion):
    t = torch.tensor([5, 600])
    x0, noise, _ = noised(diffusion, t, seed=4)
    weight = torch.zeros(4, requires_grad=True)  # scales the eps half (0, 1) and the v half (2, 3)

    def model(x, tt, y):
        return torch.cat([x[:, :2] * weight[:2, None, None] + 0.1, x[:, :2] * weight[2:, None, None]], dim=1)

    simple = diffusion.per_sample_loss(model, x0, t, None, noise).sum()
    (g_simple,) = torch.autograd.grad(simple, weight)
    hybrid = diffusion.per_sample_loss(model, x0, t, None, noise, hybrid=True).sum()
    (g_hybrid,) = torch.autograd.grad(hybrid, weight)
    assert torch.equal(g_simple[2:], torch.zeros(2))  # the MSE does not see the variance
    torch.testing.assert_close(g_hybrid[:2], g_simple[:2])  # the bound's mean uses eps detached
    assert g_hybrid[2:].abs().min() > 0
    with pytest.raises(ValueError, match="needs eps and the variance"):
        diffusion.per_sample_loss(lambda x, tt, y: x, x0, t, None, noise, hybrid=True)


def test_ddpm_with_the_learned_variance_at_its_ends_is_diffusers_fixed_variances(diffusion):
    """v = -1 is the posterior's variance (diffusers' fixed_small), v = +1 is beta_t
    (fixed_large); the 250 steps are DiT's respacing of 1000."""
    from diffusers import DDPMScheduler

    noise = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(5))

    def eps_only(x, tt):
        return 0.1 * x

    def with_v(value):
        return lambda x, tt: torch.cat([0.1 * x, torch.full_like(x, value)], dim=1)

    def gens():
        return [torch.Generator().manual_seed(i) for i in range(2)]

    small = ddpm_sample(eps_only, diffusion, noise, num_steps=25, generator=gens())
    torch.testing.assert_close(ddpm_sample(with_v(-1.0), diffusion, noise, 25, True, gens()), small, atol=1e-5, rtol=1e-5)
    sched = DDPMScheduler.from_config(diffusion.scheduler.config, clip_sample=False, timestep_spacing="linspace",
                                      variance_type="fixed_large")
    sched.set_timesteps(25)
    x, g = noise, gens()
    for t in sched.timesteps:
        x = sched.step(0.1 * x, int(t), x, generator=g).prev_sample
    torch.testing.assert_close(ddpm_sample(with_v(1.0), diffusion, noise, 25, True, gens()), x, atol=1e-5, rtol=1e-5)
    # DiT's space_timesteps(1000, "250"): strides of 999/249 from 0, rounded
    sched.set_timesteps(250)
    taken, cur = [], 0.0
    for _ in range(250):
        taken.append(round(cur))
        cur += 999 / 249
    assert sorted(int(t) for t in sched.timesteps) == taken


def test_a_hybrid_run_and_its_ddpm_samples(tmp_path):
    runner = CliRunner()
    wrong = runner.invoke(app, ["run", *TINY, f"output_dir={tmp_path / 'no'}", "train.loss=hybrid"])
    assert wrong.exit_code == 2 and "set model.params.learn_sigma=true" in wrong.output
    assert not (tmp_path / "no").exists()
    run = tmp_path / "run"
    result = runner.invoke(app, ["run", *TINY, f"output_dir={run}", "train.loss=hybrid", "model.params.learn_sigma=true"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "s"
    drawn = runner.invoke(app, ["sample", str(run), "--num", "3", "--sampler", "ddpm", "--steps", "4", "--out", str(out)])
    assert drawn.exit_code == 0, drawn.output
    assert "4 DDPM steps" in drawn.output and np.load(out / "samples.npz")["arr_0"].shape == (3, 8, 8, 1)
