"""The bilevel problem of rater meta-training, written as pure functions of parameter dicts.

Grouped noise sampling: every training sample ``(x0, y, t)`` of an inner batch comes with
``K`` candidate noises. The rater scores all ``B * K`` candidates, the scores are turned into
weights by a softmax *within each group of K* (so a per-group offset of the scores, e.g. one
that depends on the image or the label, changes nothing), and the inner loss is::

    L_in(theta, eta) = mean_b sum_k w[b, k] * ||eps[b, k] - eps_theta(x_t[b, k], t[b], y[b])||^2

with the squared error averaged over ``C, H, W``. The outer (validation) loss is the plain
epsilon loss on a held-out batch with one fixed noise per sample.

Labels are dropped by the caller (a fixed mask), noises and timesteps are fixed, so both
losses are deterministic functions of the parameters, as finite differences and
recomputation in the meta-gradient engines require.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue.attention import blocked_sdpa
from noisevalue.interfaces import Backbone, BilevelProblem, Params, Rater

__all__ = [
    "GroupedBatch",
    "PlainBatch",
    "make_problem",
    "param_dict",
    "weighted_group_loss",
    "group_scores",
    "group_weights",
    "group_stats",
    "math_sdpa",
    "meta_attention",
]


@dataclass
class GroupedBatch:
    """One inner batch: ``x0`` ``[B, C, H, W]``, ``y`` ``[B]`` long (labels already dropped)
    or ``None``, ``t`` ``[B]`` long, ``noise`` ``[B, K, C, H, W]`` (K candidates per sample)."""

    x0: torch.Tensor
    y: torch.Tensor | None
    t: torch.Tensor
    noise: torch.Tensor

    @property
    def k(self) -> int:
        return self.noise.shape[1]

    def flat(self) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """``(x0, y, t, noise)`` with the ``B * K`` candidates as one batch (group-major)."""
        b, k = self.noise.shape[:2]
        if self.x0.shape[0] != b or self.t.shape != (b,):
            raise ValueError(
                f"grouped batch: x0 {list(self.x0.shape)}, t {list(self.t.shape)} and noise "
                f"{list(self.noise.shape)} disagree on the batch size"
            )
        y = None if self.y is None else self.y.repeat_interleave(k, 0)
        return (
            self.x0.repeat_interleave(k, 0),
            y,
            self.t.repeat_interleave(k, 0),
            self.noise.reshape(b * k, *self.noise.shape[2:]),
        )


@dataclass
class PlainBatch:
    """A validation batch: ``x0``, ``noise`` ``[B, C, H, W]``, ``y`` ``[B]`` or ``None``,
    ``t`` ``[B]``."""

    x0: torch.Tensor
    y: torch.Tensor | None
    t: torch.Tensor
    noise: torch.Tensor


def math_sdpa() -> Any:
    """Context forcing the math attention kernel: the fused kernels support neither double
    backward nor forward-mode AD, which every meta-gradient path needs."""
    return sdpa_kernel(SDPBackend.MATH)


def meta_attention(problem: BilevelProblem) -> Any:
    """The attention every meta-gradient engine differentiates through: blocked attention
    when the problem sets ``attention_block`` (:func:`noisevalue.attention.blocked_sdpa`),
    else the math kernel. Engines hold it over the whole outer step, so activations
    recomputed in a backward pass run the same attention as their forward did."""
    if problem.attention_block is not None:
        return blocked_sdpa(problem.attention_block)
    return math_sdpa()


def param_dict(module: nn.Module) -> Params:
    """The trainable parameters of ``module`` as a detached dict (the ``theta`` / ``eta`` the
    meta-optimizers take). Frozen parameters (``requires_grad=False``, e.g. DiT's fixed
    ``pos_embed``) and buffers are left out: the functional calls fall back to the module's
    own tensors for them, so the inner optimizer never moves them."""
    return {n: p.detach() for n, p in module.named_parameters() if p.requires_grad}


def _wide(x: torch.Tensor) -> torch.Tensor:
    """Half precision upcast to float32; float32 / float64 kept as they are."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def group_scores(rater: nn.Module, eta: Params, batch: GroupedBatch) -> torch.Tensor:
    """Rater scores of every candidate, ``[B, K]`` (a ``grouped`` rater takes the K
    candidates of each sample at once)."""
    if isinstance(rater, Rater) and rater.grouped:
        return functional_call(rater, eta, (batch.noise, batch.t, batch.x0, batch.y))
    x0, y, t, noise = batch.flat()
    scores = functional_call(rater, eta, (noise, t, x0, y))
    return scores.reshape(batch.noise.shape[0], batch.k)


def group_weights(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the K candidates of each group (``[B, K]`` -> ``[B, K]``), in float32 or
    wider."""
    return torch.softmax(_wide(scores), dim=1)


def weighted_group_loss(scores: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
    """The inner loss of Algorithm 1 from scores and per-candidate losses (both ``[B, K]``):
    ``mean_b sum_k softmax_k(scores[b])[k] * losses[b, k]``."""
    w = group_weights(scores)
    return (w * losses.reshape(w.shape)).sum(dim=1).mean()


@torch.no_grad()
def group_stats(rater: nn.Module, eta: Params, batch: GroupedBatch) -> dict[str, float]:
    """Logging statistics of the group-wise weights: the mean within-group standard deviation
    of the scores, the mean entropy of the weights (``log K`` is uniform) and the mean
    largest weight."""
    scores = _wide(group_scores(rater, eta, batch))
    w = group_weights(scores)
    entropy = -(w * torch.log(w.clamp_min(torch.finfo(w.dtype).tiny))).sum(dim=1)
    return {
        "score_std": scores.std(dim=1, correction=0).mean().item(),
        "weight_entropy": entropy.mean().item(),
        "weight_max": w.max(dim=1).values.mean().item(),
    }


def make_problem(
    backbone: nn.Module,
    rater: nn.Module,
    diffusion: Any,
    inner_batches: list[GroupedBatch],
    val_batch: PlainBatch,
    inner_optimizer: str = "sgd",
    inner_lr: float = 1e-4,
    inner_options: dict[str, Any] | None = None,
    inner_state: dict[str, Params] | None = None,
    inner_step: int = 0,
    chunks: int = 1,
    attention_block: int | None = None,
    precision: str = "fp32",
) -> BilevelProblem:
    """The :class:`BilevelProblem` of one outer step, through ``torch.func.functional_call``.

    ``theta`` / ``eta`` dicts need only hold the trainable parameters (see
    :func:`param_dict`); anything missing is taken from the modules. The modules themselves
    are never modified. When either declares ``gradient_checkpointing``, the problem is
    ``checkpointed`` (its gradients then come from ``torch.autograd``). ``chunks``: the
    engines differentiate each batch in that many parts, one at a time (less memory, the
    same meta-gradient). ``attention_block``: differentiate through blocked attention
    over that many queries at a time instead of the math kernel (the same meta-gradient,
    no attention matrix kept). ``precision="bf16"``: the backbone's and the rater's
    forward passes (and so every derivative through them) run under bfloat16 autocast,
    while ``theta``, ``eta``, the inner optimizer's state, the losses and the softmax
    weights stay in their own (float32) precision.
    """
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"make_problem: precision must be 'fp32' or 'bf16', got {precision!r}")
    if precision == "bf16" and attention_block is None:
        raise ValueError(
            "make_problem: precision 'bf16' needs attention_block (PyTorch's math attention kernel "
            "fails under bf16 autocast inside torch.func transforms)"
        )

    def compute(x: torch.Tensor) -> Any:
        return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def eps_model(theta: Params) -> Callable[..., torch.Tensor]:
        return lambda x, t, y: functional_call(backbone, theta, (x, t, y))

    def inner_loss(theta: Params, eta: Params, batch: GroupedBatch) -> torch.Tensor:
        x0, y, t, noise = batch.flat()
        with compute(x0):
            losses = diffusion.per_sample_loss(eps_model(theta), x0, t, y, noise)
            scores = group_scores(rater, eta, batch)
        return weighted_group_loss(scores, losses)

    def outer_loss(theta: Params, batch: PlainBatch) -> torch.Tensor:
        with compute(batch.x0):
            losses = diffusion.per_sample_loss(eps_model(theta), batch.x0, batch.t, batch.y, batch.noise)
        return losses.mean()

    return BilevelProblem(
        inner_loss=inner_loss,
        outer_loss=outer_loss,
        inner_batches=list(inner_batches),
        val_batch=val_batch,
        inner_optimizer=inner_optimizer,
        inner_lr=inner_lr,
        inner_options=dict(inner_options or {}),
        inner_state=inner_state,
        inner_step=inner_step,
        chunks=chunks,
        attention_block=attention_block,
        checkpointed=any(
            isinstance(m, (Backbone, Rater)) and m.gradient_checkpointing for m in (backbone, rater)
        ),
    )
