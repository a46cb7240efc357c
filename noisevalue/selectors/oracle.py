"""The oracle: top-1 of k candidates by their gradient alignment with the validation loss.

For a candidate noise ``eps_k`` of a training sample ``(x0, y, t)`` with loss
``l_k(theta)``, the oracle score is ``<grad_theta L_val(theta), grad_theta l_k(theta)>``:
how much one small SGD step on that candidate alone lowers the validation loss (the
gradient alignment of Theorem 4.2). It is what a meta-learned rater is trained to predict,
computed exactly from the current diffusion model, and far too costly for real training (one
validation gradient and one forward-mode pass over all candidates per step): a control for
small models. It is not an upper bound on what selection can do: it is greedy (one step) and
measures alignment in the Euclidean metric of an SGD step, while training may take many
AdamW steps, whose metric is Adam's preconditioner (``oracle_precond`` ranks in that one).

All alignments come from one Jacobian-vector product: the directional derivative of the
vector of per-candidate losses along ``v = grad L_val`` is ``<grad l_k, v>`` for every
candidate at once, so no per-sample gradient is ever formed.

``oracle_precond`` ranks in the metric of the optimizer that takes the step: Adam and AdamW
move the weights along ``P g`` with ``P = diag(1 / (sqrt(v_hat) + eps))`` (``v_hat`` the
bias-corrected second moment ``exp_avg_sq``), so the first-order change of ``L_val`` that a
candidate's gradient brings is ``-lr' <P grad L_val, grad l_k>`` (``lr'`` the same for every
candidate). Its score is that product, from the same one jvp, along ``v = P grad L_val``.
For SGD ``P`` is the identity and it is the oracle. ``P`` is read from the optimizer's state
before the step (the candidate's own contribution to ``v`` is left out: one sample of one
batch, second order); a parameter without state yet (before the optimizer's first step)
has ``P = 1``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.func import functional_call, grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue.errors import ConfigError
from noisevalue.interfaces import NoiseSelector, TrainingContext

__all__ = ["OracleSelector", "PreconditionedOracleSelector", "alignment_scores", "step_metric"]

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
    metric: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``<grad_theta L_val, grad_theta l_k>`` for every candidate, ``[N, k]``.

    ``candidates`` ``[N, k, C, H, W]`` share their sample's ``x0``, ``y`` and ``t``;
    ``validation`` is ``(x0, y, t, noise)`` of the validation batch, whose mean loss is
    ``L_val``. ``theta`` is the model's trainable parameters as they are now. ``metric``: a
    diagonal ``P`` per parameter name (:func:`step_metric`); the scores are then
    ``<P grad L_val, grad l_k>``.
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
        if metric is not None:
            g_val = {name: g * metric[name] for name, g in g_val.items()}
        for lo in range(0, n * k, step):
            part = slice(lo, lo + step)
            y_part = None if y_k is None else y_k[part]

            def losses(th: dict[str, torch.Tensor], part: slice = part, y_part=y_part) -> torch.Tensor:
                return per_sample(th, x0_k[part], y_part, t_k[part], flat[part])

            out.append(jvp(losses, (params,), (g_val,))[1].detach())
    return torch.cat(out).reshape(n, k)


class OracleSelector(NoiseSelector):
    """Top-1 of ``k`` by :func:`alignment_scores` with the model being trained, against a
    fresh held-out batch of ``val_batch_size`` samples every step. A control (not a
    bound), sized for small models; ``chunk_size`` caps the candidates per forward-mode pass."""

    needs_training_context = True
    registered_as = "oracle"  # for messages

    def __init__(self, k: int = 4, val_batch_size: int = 64, chunk_size: int | None = None):
        for name, value in (("k", k), ("val_batch_size", val_batch_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"selector '{self.registered_as}': {name} must be an integer >= 1, got {value!r}")
        if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
            raise ConfigError(f"selector '{self.registered_as}': chunk_size must be an integer >= 1 or null, got {chunk_size!r}")
        self.k, self.val_batch_size, self.chunk_size = k, val_batch_size, chunk_size
        self.context: TrainingContext | None = None

    def bind(self, context: TrainingContext) -> None:
        self.context = context

    def scores(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        if self.context is None:
            raise RuntimeError(f"the {self.registered_as} selector needs the trainer's context: call bind() first")
        metric = self.metric(self.context)
        validation = self.context.validation_batch(self.val_batch_size)
        return alignment_scores(self.context.model, self.context.diffusion, x0, y, t, candidates, validation,
                                self.chunk_size, metric)

    def metric(self, context: TrainingContext) -> dict[str, torch.Tensor] | None:
        """The diagonal metric the alignment is measured in (None: the Euclidean one of an
        SGD step)."""
        return None

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


def step_metric(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor] | None:
    """The diagonal ``P`` of ``optimizer``'s step direction for each trainable parameter of
    ``model``, by name: ``1 / (sqrt(v_hat) + eps)`` for Adam and AdamW (``v_hat`` the
    bias-corrected ``exp_avg_sq``, or ``max_exp_avg_sq`` with amsgrad; 1 where there is no
    state yet); None (the identity) for SGD. Other optimizers: a ValueError."""
    if isinstance(optimizer, torch.optim.SGD):
        return None
    if not isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        raise ValueError(f"oracle_precond: no step metric known for {type(optimizer).__name__} "
                         "(known: SGD, Adam, AdamW)")
    groups = {id(p): group for group in optimizer.param_groups for p in group["params"]}
    out: dict[str, torch.Tensor] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        group = groups.get(id(p))
        if group is None:
            raise ValueError(f"oracle_precond: parameter '{name}' is not one the optimizer steps")
        state = optimizer.state.get(p, {})
        v = state.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
        if v is None:
            out[name] = torch.ones_like(p)
            continue
        correction = 1 - group["betas"][1] ** float(state["step"])
        out[name] = 1 / ((v.detach() / correction).sqrt() + group["eps"])
    return out


class PreconditionedOracleSelector(OracleSelector):
    """The oracle in the metric of the optimizer that takes the step: top-1 of ``k`` by
    ``<P grad L_val, grad l_k>``, ``P`` from :func:`step_metric` of the context's
    optimizer (identity for SGD: then it picks exactly what ``oracle`` picks)."""

    registered_as = "oracle_precond"

    def metric(self, context: TrainingContext) -> dict[str, torch.Tensor] | None:
        if context.optimizer is None:
            raise RuntimeError("the oracle_precond selector needs the trainer's context with its optimizer")
        return step_metric(context.model, context.optimizer)
