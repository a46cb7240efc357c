"""Unrolled meta-gradients: differentiate ``L_val(theta_S(eta))`` through the S inner steps.

Two modes compute the same number (to round-off):

* ``reverse``: build the whole unrolled graph (inner gradients taken with
  ``create_graph=True``) and backpropagate the validation loss to ``eta``:
  reverse-over-reverse. Memory grows with S times the double-backward graph of one step.
* ``mixed`` (MixFlow-MG style mixed-mode differentiation): the forward unroll keeps no
  graph, only ``theta_s``, the optimizer state and the inner gradient ``g_s`` of every step.
  The backward pass walks the steps from S-1 down to 0 carrying the adjoints of ``theta``
  and of the optimizer state. Through the (elementwise, cheap) optimizer update the
  adjoints move by ``torch.func.vjp``; through ``g_s = grad_theta L_in(theta_s, eta)`` they
  need ``H u`` and ``(d/d eta grad_theta L_in)^T u``, which one forward-over-reverse pass
  (jvp of the joint gradient, see :func:`~noisevalue.meta.inner.mixed_products`) gives
  without ever storing a second-order graph. Peak memory is one step's first-order graph
  plus the S stored parameter/state copies. ``hvp="double_backward"`` computes the same
  per-step products by reverse-over-reverse instead (still one step at a time, so memory
  stays flat in S; on PyTorch this can be lighter than forward mode, see the benchmark).
"""

from __future__ import annotations

import torch
from torch.func import vjp

from noisevalue.interfaces import BilevelProblem, MetaGradient, MetaOptimizer, Params
from noisevalue.meta.inner import (
    HVP_METHODS,
    check_checkpointed,
    first_order,
    from_problem,
    initial_state,
    mixed_products,
    tree_add,
    unroll,
)
from noisevalue.meta.problem import meta_attention

__all__ = ["Unrolled"]

MODES = ("reverse", "mixed")


class Unrolled(MetaOptimizer):
    """Meta-gradient through the unrolled inner loop; ``mode`` is ``"reverse"`` or
    ``"mixed"``; ``hvp`` (mixed mode only) ``"jvp"`` (forward-over-reverse) or
    ``"double_backward"``. Supports the ``sgd``, ``adam`` and ``adamw`` inner optimizers,
    from a fresh state or from the problem's ``inner_state``."""

    def __init__(self, mode: str = "reverse", hvp: str = "jvp") -> None:
        if mode not in MODES:
            raise ValueError(f"Unrolled: mode must be one of {MODES}, got {mode!r}")
        if hvp not in HVP_METHODS:
            raise ValueError(f"Unrolled: hvp must be one of {HVP_METHODS}, got {hvp!r}")
        self.mode = mode
        self.hvp = hvp

    @property
    def supports_checkpointing(self) -> bool:
        return self.mode == "reverse" or self.hvp == "double_backward"

    def meta_gradient(self, problem: BilevelProblem, theta: Params, eta: Params) -> MetaGradient:
        if self.mode == "mixed":
            check_checkpointed(problem, self.hvp, "Unrolled (mixed)")
        with meta_attention(problem):
            if self.mode == "reverse":
                return _reverse(problem, theta, eta)
            return _mixed(problem, theta, eta, self.hvp)


def _info(problem: BilevelProblem, theta: Params, losses: list[float]) -> dict[str, float]:
    with torch.no_grad():
        before = float(problem.outer_loss(theta, problem.val_batch))
    info = {"val_loss_before": before}
    if losses:
        info.update(inner_loss_first=losses[0], inner_loss_last=losses[-1])
    return info


def _reverse(problem: BilevelProblem, theta: Params, eta: Params) -> MetaGradient:
    opt = from_problem(problem)
    eta_l = {k: v.detach().requires_grad_() for k, v in eta.items()}
    th = {k: v.detach().requires_grad_() for k, v in theta.items()}
    state = initial_state(problem, opt, th)
    losses = []
    for s, batch in enumerate(problem.inner_batches):
        loss = problem.inner_loss(th, eta_l, batch)
        losses.append(float(loss.detach()))
        gs = torch.autograd.grad(loss, list(th.values()), create_graph=True, allow_unused=True)
        g = {k: torch.zeros_like(th[k]) if gk is None else gk for k, gk in zip(th, gs, strict=True)}
        th, state = opt.step(th, state, g, problem.inner_step + s + 1)
    val = problem.outer_loss(th, problem.val_batch)
    ge: tuple[torch.Tensor | None, ...]
    if val.requires_grad:
        ge = torch.autograd.grad(val, list(eta_l.values()), allow_unused=True)
    else:  # S == 0: L_val does not depend on eta
        ge = (None,) * len(eta_l)
    grad = {
        k: torch.zeros_like(v) if gk is None else gk.detach()
        for (k, v), gk in zip(eta.items(), ge, strict=True)
    }
    theta_s = {k: v.detach() for k, v in th.items()}
    state_s = {part: {k: v.detach() for k, v in tree.items()} for part, tree in state.items()}
    return MetaGradient(
        grad, theta_s, float(val.detach()), _info(problem, theta, losses), inner_state=state_s
    )


def _mixed(problem: BilevelProblem, theta: Params, eta: Params, method: str) -> MetaGradient:
    opt = from_problem(problem)
    eta = {k: v.detach() for k, v in eta.items()}
    traj = unroll(problem, theta, eta, keep=True)
    a_theta, val = first_order(problem.outer_loss, problem)(traj.theta, problem.val_batch)
    a_state = {
        name: {k: torch.zeros_like(v) for k, v in part.items()} for name, part in traj.state.items()
    }
    g_eta = {k: torch.zeros_like(v) for k, v in eta.items()}
    for s in reversed(range(len(problem.inner_batches))):
        count = problem.inner_step + s + 1

        def update(th: Params, st: dict[str, Params], g: Params, count: int = count):
            return opt.step(th, st, g, count)

        th_s, st_s, g_s = traj.thetas.pop(), traj.states.pop(), traj.grads.pop()
        _, back = vjp(update, th_s, st_s, g_s)  # type: ignore[misc]
        a_th, a_state, a_g = back((a_theta, a_state))
        del back, st_s, g_s
        h_theta, h_eta = mixed_products(
            problem.inner_loss, th_s, eta, problem.inner_batches[s], a_g, method, problem.chunks
        )
        a_theta = tree_add(a_th, h_theta)
        g_eta = tree_add(g_eta, h_eta)
    return MetaGradient(
        g_eta, traj.theta, float(val), _info(problem, theta, traj.losses), inner_state=traj.state
    )
