"""One-step lookahead meta-gradient (the paper's Theorem 4.2, gradient alignment).

One plain SGD step with the inner learning rate ``alpha`` on the first inner batch,
``theta_1 = theta - alpha * grad_theta L_in(theta, eta)``. Its exact meta-gradient is
``-alpha * (d/d eta grad_theta L_in(theta, eta))^T grad L_val(theta_1)``. Theorem 4.2 takes
the validation gradient at ``theta`` instead (first order in ``alpha``)::

    grad_eta = -alpha * d/d eta <grad_theta L_in(theta, eta), stopgrad(grad L_val(theta))>
             = -alpha / B * sum_{b,k} (d w_bk / d eta) <grad L_val(theta), grad l_bk(theta)>

so a candidate's weight grows with the alignment of its training gradient with the
validation gradient. Both cost one inner gradient, one validation gradient and one mixed
second-order product (forward-over-reverse, or ``hvp="double_backward"``), with no
per-sample gradients.
``lookahead=False`` (default) is the Theorem 4.2 form; ``lookahead=True`` the exact
one-step gradient (as in Learning-to-Reweight). ``theta`` returned is ``theta_1``; the
inner optimizer named by the problem is ignored (always plain SGD, no weight decay).
"""

from __future__ import annotations

import torch

from noisevalue.interfaces import BilevelProblem, MetaGradient, MetaOptimizer, Params
from noisevalue.meta.inner import HVP_METHODS, check_checkpointed, first_order, mixed_products
from noisevalue.meta.problem import meta_attention

__all__ = ["OneStep"]


class OneStep(MetaOptimizer):
    """First-order lookahead; uses only ``problem.inner_batches[0]``."""

    def __init__(self, lookahead: bool = False, hvp: str = "jvp") -> None:
        if hvp not in HVP_METHODS:
            raise ValueError(f"OneStep: hvp must be one of {HVP_METHODS}, got {hvp!r}")
        self.lookahead = lookahead
        self.hvp = hvp

    @property
    def supports_checkpointing(self) -> bool:
        return self.hvp == "double_backward"

    def meta_gradient(self, problem: BilevelProblem, theta: Params, eta: Params) -> MetaGradient:
        if not problem.inner_batches:
            raise ValueError("OneStep: the problem has no inner batch")
        check_checkpointed(problem, self.hvp, "OneStep")
        alpha = problem.inner_lr
        batch = problem.inner_batches[0]
        theta = {k: v.detach() for k, v in theta.items()}
        eta = {k: v.detach() for k, v in eta.items()}
        with meta_attention(problem):
            g, inner = first_order(problem.inner_loss, problem)(theta, eta, batch)
            theta_1 = {k: theta[k] - alpha * g[k] for k in theta}
            at = theta_1 if self.lookahead else theta
            g_val, val_at = first_order(problem.outer_loss, problem)(at, problem.val_batch)
            _, m = mixed_products(problem.inner_loss, theta, eta, batch, g_val, self.hvp, problem.chunks)
            if self.lookahead:
                val_1 = val_at
            else:
                with torch.no_grad():
                    val_1 = problem.outer_loss(theta_1, problem.val_batch)
        grad = {k: -alpha * m[k] for k in eta}
        info = {"inner_loss_first": float(inner)}
        if not self.lookahead:
            info["val_loss_before"] = float(val_at)
        return MetaGradient(grad, theta_1, float(val_1), info)
