"""The oracle: top-1 of k candidates by their gradient alignment with the validation loss.

For a candidate noise ``eps_k`` of a training sample ``(x0, y, t)`` with loss
``l_k(theta)``, the oracle score is ``<grad_theta L_val(theta), grad_theta l_k(theta)>``:
how much one small SGD step on that candidate alone lowers the validation loss (the
gradient alignment of Theorem 4.2). It is what a meta-learned rater is trained to predict,
computed exactly from the current diffusion model, so selection by it is an upper bound on
what rater-based selection can do, and far too costly for real training (one validation
gradient and one forward-mode pass over all candidates per step): a control for small models.

All alignments come from one Jacobian-vector product: the directional derivative of the
vector of per-candidate losses along ``v = grad L_val`` is ``<grad l_k, v>`` for every
candidate at once, so no per-sample gradient is ever formed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue.errors import ConfigError
from noisevalue.interfaces import NoiseSelector, TrainingContext

__all__ = ["OracleSelector", "alignment_scores"]

Batch = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]


def _losses(model: nn.Module, diffusion, params: dict[str, torch.Tensor]) -> Callable[..., torch.Tensor]:
    def per_sample(th: dict[str, torch.Tensor], x0, y, t, noise) -> torch.Tensor:
        def eps(x: torch.Tensor, tt: torch.Tensor, yy: torch.Tensor | None) -> torch.Tensor:
            return functional_call(model, th, (x, tt, yy))

        return diffusion.per_sample_loss(eps, x0, t, y, noise)

    return per_sample


def alignment_scores(
    model: nn.Module,
    diffusion,
    x0: torch.Tensor,
    y: torch.Tensor | None,
    t: torch.Tensor,
    candidates: torch.Tensor,
    validation: Batch,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """``<grad_theta L_val, grad_theta l_k>`` for every candidate, ``[N, k]``.

    ``candidates`` ``[N, k, C, H, W]`` share their sample's ``x0``, ``y`` and ``t``;
    ``validation`` is ``(x0, y, t, noise)`` of the validation batch, whose mean loss is
    ``L_val``. ``theta`` is the model's trainable parameters as they are now.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    per_sample = _losses(model, diffusion, params)
    n, k = candidates.shape[:2]
    flat = candidates.reshape(n * k, *candidates.shape[2:])
    x0_k, t_k = x0.repeat_interleave(k, 0), t.repeat_interleave(k, 0)
    y_k = None if y is None else y.repeat_interleave(k, 0)
    vx0, vy, vt, vnoise = validation
    step = chunk_size or n * k
    out = []
    # forward-mode AD needs the math attention kernel; the trainer may run under no_grad
    with sdpa_kernel(SDPBackend.MATH), torch.enable_grad():
        g_val = grad(lambda th: per_sample(th, vx0, vy, vt, vnoise).mean())(params)
        for lo in range(0, n * k, step):
            part = slice(lo, lo + step)
            y_part = None if y_k is None else y_k[part]

            def losses(th: dict[str, torch.Tensor], part: slice = part, y_part=y_part) -> torch.Tensor:
                return per_sample(th, x0_k[part], y_part, t_k[part], flat[part])

            out.append(jvp(losses, (params,), (g_val,))[1].detach())
    return torch.cat(out).reshape(n, k)


class OracleSelector(NoiseSelector):
    """Top-1 of ``k`` by :func:`alignment_scores` with the model being trained, against a
    fresh held-out batch of ``val_batch_size`` samples every step. A control (an upper
    bound), sized for small models; ``chunk_size`` caps the candidates per forward-mode pass."""

    needs_training_context = True

    def __init__(self, k: int = 4, val_batch_size: int = 64, chunk_size: int | None = None):
        for name, value in (("k", k), ("val_batch_size", val_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"selector 'oracle': {name} must be an integer >= 1, got {value!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"selector 'oracle': chunk_size must be an integer >= 1 or null, got {chunk_size!r}")
        self.k, self.val_batch_size, self.chunk_size = k, val_batch_size, chunk_size
        self.context: TrainingContext | None = None

    def bind(self, context: TrainingContext) -> None:
        self.context = context

    def scores(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError("the oracle selector needs the trainer's context: call bind() first")
        validation = self.context.validation_batch(self.val_batch_size)
        return alignment_scores(
            self.context.model, self.context.diffusion, x0, y, t, candidates, validation, self.chunk_size
        )

    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if candidates.ndim != 5 or candidates.shape[1] != self.k or candidates.shape[0] != x0.shape[0]:
            raise ValueError(f"OracleSelector (k={self.k}) expects candidates [N, {self.k}, C, H, W] for "
                             f"{x0.shape[0]} samples, got {list(candidates.shape)}")
        scores = self.scores(x0, y, t, candidates)
        pick = scores.argmax(dim=1)
        # what the pick gains over candidate 0 at first order (the training's noise diagnostics)
        self.last_gain = scores.gather(1, pick[:, None])[:, 0] - scores[:, 0]
        return pick
