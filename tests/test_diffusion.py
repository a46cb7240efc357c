"""The diffusion process against closed forms: schedule, loss, guidance, DDIM/DDPM sampling."""

import numpy as np
import pytest
import torch

from noisevalue.diffusion import Diffusion, ddim_sample, drop_labels, guided_eps


def closed_form_alphas_cumprod():
    betas = np.linspace(1e-4, 0.02, 1000, dtype=np.float64)
    return np.cumprod(1.0 - betas)


def test_schedule_is_ddpm_linear():
    d = Diffusion()
    # diffusers builds the table in float32; agreement to float32 precision
    np.testing.assert_allclose(d.alphas_cumprod.numpy(), closed_form_alphas_cumprod(), rtol=2e-6)


class AffineModel(torch.nn.Module):
    """eps_theta(x, t, y) = a * x + b * t + c * y, enough to check the loss by hand."""

    def forward(self, x, t, y):
        return 0.5 * x + 1e-3 * t.view(-1, 1, 1, 1) + 0.1 * y.view(-1, 1, 1, 1)


def test_per_sample_loss_matches_hand_computation():
    d = Diffusion()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    noise = torch.randn(3, 2, 4, 4, generator=g, dtype=torch.float64)
    t = torch.tensor([0, 499, 999])
    y = torch.tensor([1, 0, 3])
    loss = d.per_sample_loss(AffineModel(), x0, t, y, noise)
    abar = closed_form_alphas_cumprod()
    for i in range(3):
        a = abar[t[i].item()]
        xt = np.sqrt(a) * x0[i].numpy() + np.sqrt(1 - a) * noise[i].numpy()
        pred = 0.5 * xt + 1e-3 * t[i].item() + 0.1 * y[i].item()
        expected = np.mean((noise[i].numpy() - pred) ** 2)
        assert loss[i].item() == pytest.approx(expected, rel=1e-5)
    assert loss.shape == (3,)


def test_loss_ignores_learned_sigma_channels():
    d = Diffusion()
    x0, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    t = torch.tensor([10, 900])

    def model(x, t, y):  # eps channels exact, sigma channels garbage
        return torch.cat([noise, 1e6 * torch.ones_like(x)], dim=1)

    assert torch.all(d.per_sample_loss(model, x0, t, None, noise) == 0)


def test_drop_labels_fraction_and_null_value():
    y = torch.zeros(20000, dtype=torch.long)
    out = drop_labels(y, 0.1, null_label=10, generator=torch.Generator().manual_seed(0))
    frac = (out == 10).float().mean().item()
    assert abs(frac - 0.1) < 0.01
    assert set(out.unique().tolist()) == {0, 10}


def test_guidance_is_applied_to_all_eps_channels():
    # eps(x, t, y) = x * (y + 1); learned-sigma channels appended
    def model(x, t, y):
        eps = x * (y.view(-1, 1, 1, 1).float() + 1)
        return torch.cat([eps, torch.zeros_like(x)], dim=1)

    x, t = torch.randn(2, 4, 3, 3), torch.zeros(2, dtype=torch.long)
    y = torch.tensor([2, 5])
    num_classes, s = 7, 3.0
    out = guided_eps(model, num_classes, y, s)(x, t)
    cond = x * (y.view(-1, 1, 1, 1) + 1)
    uncond = x * (num_classes + 1)
    torch.testing.assert_close(out, uncond + s * (cond - uncond))
    assert out.shape == x.shape


# --- samplers on a Gaussian toy: data x0 ~ N(mu, s^2) per dimension, exact eps-predictor ---
MU, SD = 0.7, 0.3


def exact_eps(d: Diffusion):
    abar = d.alphas_cumprod

    def eps(x, t):
        a = abar[t].to(x.dtype).view(-1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * SD**2 + 1 - a)

    return eps


def reference_ddim(x_T: np.ndarray, steps: int) -> np.ndarray:
    """DDIM (eta=0) written out in numpy float64, trailing spacing, final alpha 1."""
    abar = closed_form_alphas_cumprod()
    ts = np.round(np.arange(1000, 0, -1000 / steps)).astype(int) - 1
    x = x_T.copy()
    for i, t in enumerate(ts):
        a = abar[t]
        a_prev = abar[ts[i + 1]] if i + 1 < len(ts) else 1.0
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * MU) / (a * SD**2 + 1 - a)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(a_prev) * x0 + np.sqrt(1 - a_prev) * eps
    return x


@pytest.mark.parametrize("steps", [1000, 50])
def test_ddim_eta0_matches_reference_recursion_and_maps_noise_to_data(steps):
    """With the exact predictor the probability-flow ODE is linear: x0 = mu + s * z."""
    d = Diffusion()
    z = torch.randn(4000, 1, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    a_T = d.alphas_cumprod[-1]
    x_T = a_T.sqrt() * MU + (a_T * SD**2 + 1 - a_T).sqrt() * z
    x0 = ddim_sample(exact_eps(d), d, x_T, num_steps=steps, eta=0.0)
    np.testing.assert_allclose(x0.numpy(), reference_ddim(x_T.numpy(), steps), atol=1e-5)
    # a correct sampler of N(mu, s^2): the ODE's linear map, up to discretisation
    if steps == 1000:
        torch.testing.assert_close(x0, MU + SD * z, atol=0.01, rtol=0)


def test_ddim_eta1_full_steps_matches_ddpm_ancestral_sampling():
    from diffusers import DDPMScheduler

    d = Diffusion()
    n = 20000
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(n, 1, generator=g, dtype=torch.float64)
    ddim = ddim_sample(exact_eps(d), d, x_T.clone(), num_steps=1000, eta=1.0, generator=g)

    sched = DDPMScheduler.from_config(d.scheduler.config)
    sched.set_timesteps(1000)
    x = x_T.clone()
    eps = exact_eps(d)
    for t in sched.timesteps:
        tt = torch.full((n,), int(t), dtype=torch.long)
        x = sched.step(eps(x, tt), int(t), x, generator=g).prev_sample
    # both are exact samplers of N(mu, s^2) up to discretisation; 3-sigma statistical bounds
    for samples in (ddim, x):
        assert abs(samples.mean().item() - MU) < 3 * SD / np.sqrt(n)
        assert abs(samples.std().item() - SD) < 3 * SD / np.sqrt(2 * n) + 2e-3
    assert abs(ddim.mean().item() - x.mean().item()) < 4 * SD / np.sqrt(n)


def test_guided_eps_in_bf16_runs_the_model_under_autocast_and_returns_float32():
    from noisevalue.backbones.dit import DiT
    from noisevalue.diffusion import guided_eps

    torch.manual_seed(0)
    model = DiT(8, 2, 1, 64, 2, 4, num_classes=10, learn_sigma=False).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave adaLN-Zero's all-zero output
        x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([10, 200, 500, 900]), torch.tensor([0, 3, 10, 7])
        full = guided_eps(model, 10, y, 1.5)(x, t)
        half = guided_eps(model, 10, y, 1.5, "bf16")(x, t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, 10)])).float()
    cond, uncond = out.chunk(2)
    assert half.dtype == torch.float32 and torch.equal(half, uncond + 1.5 * (cond - uncond))
    assert not torch.equal(half, full) and torch.allclose(half, full, atol=0.05 * full.abs().max().item())
