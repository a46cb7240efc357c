"""The diffusion process: schedule, forward noising, per-sample loss, DDIM sampling.

The noise schedule comes from diffusers' schedulers (DDPM linear betas 1e-4..0.02 over
T=1000 by default), so the tables match the rest of the field bit for bit. The training
objective is epsilon prediction; losses are returned *per sample* because noise selection
and meta-training weight or pick individual samples.

Classifier-free guidance is applied to every epsilon channel (the official DiT code guides
only the first three of four latent channels, a quirk we do not reproduce). Learned-sigma
channels, if the backbone has them, are ignored by the epsilon objective and by DDIM; DiT's
hybrid loss (``train.loss: hybrid``) trains them and DDPM sampling (``sample.sampler:
ddpm``) uses them.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class Diffusion:
    """DDPM forward process and epsilon objective over ``num_timesteps`` steps."""

    def __init__(
        self,
        num_timesteps: int = 1000,
        beta_schedule: str = "linear",
        beta_start: float = 1e-4,
        beta_end: float = 0.02,
    ) -> None:
        from diffusers import DDPMScheduler

        scheduler: Any = DDPMScheduler(
            num_train_timesteps=num_timesteps,
            beta_schedule=beta_schedule,
            beta_start=beta_start,
            beta_end=beta_end,
            prediction_type="epsilon",
            clip_sample=False,
        )
        self.scheduler = scheduler
        self.num_timesteps = num_timesteps
        # float64 master copy; cast to the data dtype at use.
        self.alphas_cumprod = scheduler.alphas_cumprod.to(torch.float64)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self._posterior_on: dict[torch.device, dict[str, torch.Tensor]] = {}

    def _alphas(self, device: torch.device) -> torch.Tensor:
        """``alphas_cumprod`` on ``device``, copied there once: a copy at every step would
        make the host wait for the device each time."""
        if device.type == "cpu":
            return self.alphas_cumprod
        if device not in self._on_device:
            self._on_device[device] = self.alphas_cumprod.to(device)
        return self._on_device[device]

    @classmethod
    def from_config(cls, cfg: Any) -> Diffusion:
        return cls(cfg.num_timesteps, cfg.beta_schedule, cfg.beta_start, cfg.beta_end)

    def _coef(self, t: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self._alphas(like.device)[t].to(like.dtype)
        shape = (-1,) + (1,) * (like.dim() - 1)
        return a.sqrt().view(shape), (1 - a).sqrt().view(shape)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps."""
        s, n = self._coef(t, x0)
        return s * x0 + n * noise

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        """``abar_t / (1 - abar_t)`` per timestep, float64 (``inf`` where ``abar_t = 1``)."""
        a = self._alphas(t.device)[t]
        return a / (1 - a)

    def sample_timesteps(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_timesteps, (n,), generator=generator)

    def per_sample_loss(
        self,
        model: nn.Module | Callable[..., torch.Tensor],
        x0: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None,
        noise: torch.Tensor,
        t_cond: torch.Tensor | None = None,
        hybrid: bool = False,
    ) -> torch.Tensor:
        """||eps - eps_theta(x_t, t, y)||^2 averaged over C, H, W: one value per sample.
        ``t_cond``: the timesteps the model is told (default ``t``; ``NULL_TIMESTEP`` where
        the time condition is dropped), while ``x_t`` is noised at ``t``. ``hybrid``: plus
        the variational bound's term of the learned variance (:meth:`vlb_terms`; DiT's
        ``L_simple + L_vlb``), for a model that outputs ``2C`` channels."""
        x_t = self.q_sample(x0, t, noise)
        out = model(x_t, t if t_cond is None else t_cond, y)
        pred = out[:, : x0.shape[1]]
        err = noise - pred
        err = err.to(torch.promote_types(err.dtype, torch.float32))  # half -> fp32, fp64 stays
        loss = err.pow(2).flatten(1).mean(dim=1)
        if hybrid:
            if out.shape[1] != 2 * x0.shape[1]:
                raise ValueError(f"the hybrid loss needs eps and the variance ({2 * x0.shape[1]} channels), "
                                 f"the model gives {out.shape[1]}")
            wide = torch.promote_types(out.dtype, torch.float32)
            loss = loss + self.vlb_terms(out.to(wide), x0.to(wide), x_t.to(wide), t)
        return loss

    # ------------------------------------------------------------ the learned variance
    def _posterior_tables(self, device: torch.device) -> dict[str, torch.Tensor]:
        """The schedule's per-timestep coefficients of ``q(x_{t-1} | x_t, x_0)`` (float64),
        computed once and copied to ``device`` once, as :meth:`_alphas` is."""
        if device not in self._posterior_on:
            a = self.alphas_cumprod
            prev = torch.cat([a.new_ones(1), a[:-1]])
            betas = 1 - a / prev
            var = betas * (1 - prev) / (1 - a)
            tables = {
                "log_var": torch.log(torch.cat([var[1:2], var[1:]])),  # t = 0 clipped to t = 1's
                "log_beta": torch.log(betas),
                "coef0": betas * prev.sqrt() / (1 - a),
                "coef_t": (1 - prev) * (1 - betas).sqrt() / (1 - a),
                "sqrt_a": a.sqrt(),
                "sqrt_1ma": (1 - a).sqrt(),
            }
            self._posterior_on[device] = {k: v.to(device) for k, v in tables.items()}
        return self._posterior_on[device]

    def _at(self, name: str, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self._posterior_tables(like.device)[name][t].to(like.dtype).view((-1,) + (1,) * (like.dim() - 1))

    def posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log variance of ``q(x_{t-1} | x_t, x_0)``; the log variance at t = 0
        clipped to t = 1's, as in improved DDPM and DiT."""
        mean = self._at("coef0", t, x0) * x0 + self._at("coef_t", t, x_t) * x_t
        return mean, self._at("log_var", t, x_t).expand_as(x_t)

    def vlb_terms(self, out: torch.Tensor, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The variational bound's term of each sample, in bits per dimension, for a model
        output ``[eps, v]`` (``2C`` channels): ``KL(q(x_{t-1}|x_t,x_0) || p(x_{t-1}|x_t))``
        for t > 0, the decoder's negative log-likelihood for t = 0. ``p``'s log variance
        interpolates ``frac = (v + 1) / 2`` between the posterior's (clipped) and
        ``log beta_t``; its mean uses eps detached, so this term trains the variance only
        (DiT's hybrid loss, from improved DDPM)."""
        c = x0.shape[1]
        eps, v = out[:, :c].detach(), out[:, c:]
        true_mean, true_log_var = self.posterior(x0, x_t, t)
        pred_x0 = (x_t - self._at("sqrt_1ma", t, x_t) * eps) / self._at("sqrt_a", t, x_t)
        mean, _ = self.posterior(pred_x0, x_t, t)
        frac = (v + 1) / 2
        log_var = frac * self._at("log_beta", t, x_t) + (1 - frac) * true_log_var
        kl = 0.5 * (-1.0 + log_var - true_log_var + torch.exp(true_log_var - log_var)
                    + (true_mean - mean) ** 2 * torch.exp(-log_var))
        nll = -_discretized_gaussian_log_likelihood(x0, mean, 0.5 * log_var)
        terms = torch.where((t == 0).view((-1,) + (1,) * (x0.dim() - 1)), nll, kl)
        return terms.flatten(1).mean(dim=1) / math.log(2.0)


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def _discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of ``x`` in [-1, 1] under a Gaussian discretised into 256 bins (the
    edge bins open), as improved DDPM and DiT score their decoder."""
    centered = x - means
    inv_std = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_std * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_std * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))


def drop_labels(
    y: torch.Tensor, prob: float, null_label: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Replace labels by ``null_label`` with probability ``prob`` (a fixed, seeded mask)."""
    if prob <= 0:
        return y
    mask = torch.rand(y.shape, generator=generator) < prob
    return torch.where(mask.to(y.device), torch.full_like(y, null_label), y)


def guided_eps(
    model: nn.Module, num_classes: int, y: torch.Tensor | None, cfg_scale: float, precision: str = "fp32",
    nag_scale: float = 0.0, variance: bool = False,
) -> EpsFn:
    """eps(x, t) with classifier-free guidance on all epsilon channels. ``precision="bf16"``
    runs the model under bf16 autocast; the guidance and the sampler stay in float32.
    ``nag_scale`` w > 0 adds Noise Awareness Guidance, ``w * (eps(x, t) - eps(x, null_t))``
    with the same labels (a model trained with ``time_dropout_prob > 0``); w = 0 is the
    plain (CFG-guided) prediction, computed exactly as without it. ``variance``: the
    model's variance channels (of the conditional prediction) follow the guided eps, for a
    sampler that uses the learned variance."""

    def forward(*args: torch.Tensor | None) -> torch.Tensor:
        if precision != "bf16":
            return model(*args)
        device = args[0].device.type  # type: ignore[union-attr]
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(*args).float()

    def cfg_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if y is None or num_classes == 0 or cfg_scale == 1.0:
            out = forward(x, t, y)
            return out if variance else out[:, :c]
        null = torch.full_like(y, num_classes)
        out = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
        cond, uncond = out[:, :c].chunk(2)
        eps = uncond + cfg_scale * (cond - uncond)
        return torch.cat([eps, out[: len(x), c:]], dim=1) if variance else eps

    if nag_scale == 0:
        return cfg_eps

    def nag_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from noisevalue.interfaces import NULL_TIMESTEP

        c = x.shape[1]
        cond = forward(x, t, y)[:, :c]
        no_time = forward(x, torch.full_like(t, NULL_TIMESTEP), y)[:, :c]
        guided = cfg_eps(x, t)
        eps = guided[:, :c] + nag_scale * (cond - no_time)
        return torch.cat([eps, guided[:, c:]], dim=1) if variance else eps

    return nag_eps


@torch.no_grad()
def ddpm_sample(
    eps_fn: EpsFn,
    diffusion: Diffusion,
    noise: torch.Tensor,
    num_steps: int = 250,
    learned_variance: bool = False,
    generator: torch.Generator | list[torch.Generator] | None = None,
) -> torch.Tensor:
    """Ancestral DDPM from ``noise`` over ``num_steps`` evenly spaced timesteps (999 to 0,
    as DiT respaces them) with diffusers' DDPMScheduler: the learned variance
    (``learned_range``: ``eps_fn`` gives ``[eps, v]``) or the posterior's."""
    from diffusers import DDPMScheduler

    sched = DDPMScheduler.from_config(
        diffusion.scheduler.config, clip_sample=False, timestep_spacing="linspace",
        variance_type="learned_range" if learned_variance else "fixed_small",
    )
    sched.set_timesteps(num_steps)
    x = noise
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x = sched.step(eps_fn(x, tt), int(t), x, generator=generator).prev_sample
    return x


def ddim_scheduler(diffusion: Diffusion, timestep_spacing: str = "trailing") -> Any:
    """diffusers' DDIMScheduler as noisevalue samples with it (the run's schedule, no
    clipping, alpha_0 = 1): :func:`ddim_sample`'s, and an exported pipeline's."""
    from diffusers import DDIMScheduler

    return DDIMScheduler.from_config(diffusion.scheduler.config, clip_sample=False, set_alpha_to_one=True,
                                     timestep_spacing=timestep_spacing)


@torch.no_grad()
def ddim_sample(
    eps_fn: EpsFn,
    diffusion: Diffusion,
    noise: torch.Tensor,
    num_steps: int = 50,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    timestep_spacing: str = "trailing",
) -> torch.Tensor:
    """DDIM from ``noise`` (x_T) to x_0 with diffusers' DDIMScheduler.

    ``eta=0`` is deterministic DDIM; ``eta=1`` with ``num_steps = T`` is ancestral DDPM
    sampling with the posterior variance. ``trailing`` spacing starts at t = T - 1.
    """
    sched = ddim_scheduler(diffusion, timestep_spacing)
    sched.set_timesteps(num_steps)
    x = noise
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt)
        x = sched.step(eps, int(t), x, eta=eta, generator=generator).prev_sample
    return x
