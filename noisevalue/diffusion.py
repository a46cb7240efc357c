"""The diffusion process: schedule, forward noising, per-sample loss, DDIM sampling.

The noise schedule comes from diffusers' schedulers (DDPM linear betas 1e-4..0.02 over
T=1000 by default), so the tables match the rest of the field bit for bit. The training
objective is epsilon prediction; losses are returned *per sample* because noise selection
and meta-training weight or pick individual samples.

Classifier-free guidance is applied to every epsilon channel (the official DiT code guides
only the first three of four latent channels, a quirk we do not reproduce); learned-sigma
channels, if the backbone has them, are ignored by the epsilon objective and by DDIM.
"""

from __future__ import annotations

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
    ) -> torch.Tensor:
        """||eps - eps_theta(x_t, t, y)||^2 averaged over C, H, W: one value per sample.
        ``t_cond``: the timesteps the model is told (default ``t``; ``NULL_TIMESTEP`` where
        the time condition is dropped), while ``x_t`` is noised at ``t``."""
        x_t = self.q_sample(x0, t, noise)
        pred = model(x_t, t if t_cond is None else t_cond, y)[:, : x0.shape[1]]
        err = noise - pred
        err = err.to(torch.promote_types(err.dtype, torch.float32))  # half -> fp32, fp64 stays
        return err.pow(2).flatten(1).mean(dim=1)


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
    nag_scale: float = 0.0,
) -> EpsFn:
    """eps(x, t) with classifier-free guidance on all epsilon channels. ``precision="bf16"``
    runs the model under bf16 autocast; the guidance and the sampler stay in float32.
    ``nag_scale`` w > 0 adds Noise Awareness Guidance, ``w * (eps(x, t) - eps(x, null_t))``
    with the same labels (a model trained with ``time_dropout_prob > 0``); w = 0 is the
    plain (CFG-guided) prediction, computed exactly as without it."""

    def forward(*args: torch.Tensor | None) -> torch.Tensor:
        if precision != "bf16":
            return model(*args)
        device = args[0].device.type  # type: ignore[union-attr]
        with torch.autocast(device, dtype=torch.bfloat16):
            return model(*args).float()

    def cfg_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c = x.shape[1]
        if y is None or num_classes == 0 or cfg_scale == 1.0:
            return forward(x, t, y)[:, :c]
        null = torch.full_like(y, num_classes)
        out = forward(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))[:, :c]
        cond, uncond = out.chunk(2)
        return uncond + cfg_scale * (cond - uncond)

    if nag_scale == 0:
        return cfg_eps

    def nag_eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        from noisevalue.interfaces import NULL_TIMESTEP

        c = x.shape[1]
        cond = forward(x, t, y)[:, :c]
        no_time = forward(x, torch.full_like(t, NULL_TIMESTEP), y)[:, :c]
        return cfg_eps(x, t) + nag_scale * (cond - no_time)

    return nag_eps


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
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(
        diffusion.scheduler.config,
        clip_sample=False,
        set_alpha_to_one=True,
        timestep_spacing=timestep_spacing,
    )
    sched.set_timesteps(num_steps)
    x = noise
    for t in sched.timesteps:
        tt = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = eps_fn(x, tt)
        x = sched.step(eps, int(t), x, eta=eta, generator=generator).prev_sample
    return x
