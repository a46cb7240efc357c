"""Functional, differentiable inner optimizers, the inner unroll, and the second-order
products of the inner loss every meta-gradient engine needs.

An inner optimizer maps ``(theta, state, grad, count) -> (theta', state')`` on parameter
dicts with out-of-place tensor arithmetic only, so autograd (reverse-over-reverse through S
steps) and ``torch.func.vjp`` (the hand-written mixed-mode backward) both see through it.

* ``sgd``: ``theta - lr * (g + wd * theta)``; with ``momentum`` the PyTorch heavy-ball
  buffer ``buf = momentum * buf + g`` (a zero buffer makes the first step ``buf = g``).
* ``adam``: bias-corrected Adam, L2 weight decay added to the gradient (as
  ``torch.optim.Adam``); ``adamw``: decoupled weight decay ``theta - lr * wd * theta`` (as
  ``torch.optim.AdamW``). The step is ``m_hat / (sqrt(v_hat + eps_root) + eps)`` with
  ``eps_root > 0`` (as in optax/torchopt): without it ``d sqrt(v) / dv`` is infinite where
  ``v == 0`` and meta-gradients turn NaN. Every option defaults to 0 / PyTorch's value except
  weight decay, which is 0 for every optimizer (no hidden regulariser).

The optimizer state the S steps start from is the problem's ``inner_state`` (for example
the diffusion trainer's AdamW moments saved in the checkpoint, Algorithm 1's "optimizer D"
with its state), counted from ``inner_step``; without one it is a fresh zero state counted
from 1. Either way the starting state is a constant: the meta-gradient is a function of
``(theta, eta)`` alone.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.func import grad, grad_and_value, jvp

from noisevalue.errors import ConfigError
from noisevalue.interfaces import BilevelProblem, Params

__all__ = [
    "InnerOptimizer",
    "make_inner_optimizer",
    "Trajectory",
    "unroll",
    "hvp",
    "mixed_products",
    "HVP_METHODS",
]

State = dict[str, Params]
_OPTIONS = {
    "sgd": {"weight_decay", "momentum"},
    "adam": {"betas", "eps", "eps_root", "weight_decay"},
    "adamw": {"betas", "eps", "eps_root", "weight_decay"},
}


@dataclass(frozen=True)
class InnerOptimizer:
    """A differentiable optimizer; ``count`` in :meth:`step` is the 1-based step number
    (for Adam, the step count that its bias corrections use)."""

    name: str
    lr: float
    weight_decay: float = 0.0
    momentum: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    eps_root: float = 1e-16

    def init(self, theta: Params) -> State:
        """Zero state for ``theta`` (``{}`` for plain SGD)."""
        if self.name == "sgd":
            return {"buf": _zeros(theta)} if self.momentum else {}
        return {"m": _zeros(theta), "v": _zeros(theta)}

    def step(self, theta: Params, state: State, g: Params, count: int) -> tuple[Params, State]:
        lr, wd = self.lr, self.weight_decay
        if self.name == "sgd":
            d = {k: g[k] + wd * theta[k] for k in theta} if wd else g
            if self.momentum:
                d = {k: self.momentum * state["buf"][k] + d[k] for k in theta}
                state = {"buf": d}
            return {k: theta[k] - lr * d[k] for k in theta}, state
        b1, b2 = self.betas
        if self.name == "adam" and wd:
            g = {k: g[k] + wd * theta[k] for k in theta}
        m = {k: b1 * state["m"][k] + (1 - b1) * g[k] for k in theta}
        v = {k: b2 * state["v"][k] + (1 - b2) * g[k] * g[k] for k in theta}
        c1, c2 = 1 - b1**count, 1 - b2**count
        new = {}
        for k in theta:
            upd = (m[k] / c1) / (torch.sqrt(v[k] / c2 + self.eps_root) + self.eps)
            if self.name == "adamw" and wd:
                upd = upd + wd * theta[k]
            new[k] = theta[k] - lr * upd
        return new, {"m": m, "v": v}


def make_inner_optimizer(
    name: str, lr: float, options: dict[str, Any] | None = None
) -> InnerOptimizer:
    """Validate and build an :class:`InnerOptimizer` (unknown options are an error)."""
    options = dict(options or {})
    if name not in _OPTIONS:
        raise ConfigError(f"inner optimizer '{name}' is not one of {', '.join(_OPTIONS)}")
    unknown = set(options) - _OPTIONS[name]
    if unknown:
        raise ConfigError(
            f"inner optimizer '{name}' has no option(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(_OPTIONS[name]))}"
        )
    if "betas" in options:
        options["betas"] = tuple(float(b) for b in options["betas"])
    opt = InnerOptimizer(name=name, lr=float(lr), **options)
    if opt.lr <= 0 or opt.weight_decay < 0 or not 0 <= opt.momentum < 1:
        raise ConfigError(
            f"inner optimizer: lr must be > 0, weight_decay >= 0, 0 <= momentum < 1; got {opt}"
        )
    if name != "sgd" and (
        opt.eps_root <= 0
        or opt.eps < 0
        or len(opt.betas) != 2
        or not all(0 <= b < 1 for b in opt.betas)
    ):
        raise ConfigError(
            f"inner optimizer: needs eps_root > 0, eps >= 0, betas in [0, 1); got {opt}"
        )
    return opt


def from_problem(problem: BilevelProblem) -> InnerOptimizer:
    return make_inner_optimizer(problem.inner_optimizer, problem.inner_lr, problem.inner_options)


def initial_state(problem: BilevelProblem, opt: InnerOptimizer, theta: Params) -> State:
    """The optimizer state the inner loop starts from: the problem's ``inner_state`` (checked
    against ``theta``, detached, moved to its dtype and device) or a fresh zero state."""
    fresh = opt.init(theta)
    given = problem.inner_state
    if given is None:
        return fresh
    if set(given) != set(fresh):
        raise ValueError(
            f"inner_state holds {sorted(given)}, but the '{opt.name}' inner optimizer "
            f"needs {sorted(fresh)}"
        )
    state: State = {}
    for part, zeros in fresh.items():
        if set(given[part]) != set(zeros):
            missing = sorted(set(zeros) - set(given[part]))[:3]
            raise ValueError(f"inner_state['{part}'] does not match theta (missing e.g. {missing})")
        state[part] = {}
        for k, z in zeros.items():
            v = given[part][k]
            if v.shape != z.shape:
                raise ValueError(
                    f"inner_state['{part}']['{k}'] has shape {list(v.shape)}, theta {list(z.shape)}"
                )
            state[part][k] = v.detach().to(dtype=z.dtype, device=z.device)
    return state


def batch_chunks(batch: Any, chunks: int) -> list[tuple[float, Any]]:
    """``(weight, part)`` pairs: ``batch`` (a dataclass of tensors along dim 0) cut into up to
    ``chunks`` consecutive parts, ``weight`` = part size / batch size. The problem's losses
    are means over dim 0, so a loss, its gradient and its second-order products are the
    weighted sums of the parts' ones, and each part's graph is freed before the next."""
    if chunks <= 1:
        return [(1.0, batch)]
    fields = {f.name: getattr(batch, f.name) for f in dataclasses.fields(batch)}
    n = next(v.shape[0] for v in fields.values() if torch.is_tensor(v))
    out = []
    for idx in torch.arange(n).tensor_split(min(chunks, n)):
        lo, hi = int(idx[0]), int(idx[-1]) + 1
        part = dataclasses.replace(batch, **{k: v[lo:hi] if torch.is_tensor(v) else v for k, v in fields.items()})
        out.append(((hi - lo) / n, part))
    return out


def _weighted_sum(terms: list[tuple[float, Any]]) -> Any:
    """Σ w * tree over ``(w, tree)`` pairs; trees are tensors, dicts or tuples of them."""
    def scale(w: float, tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: scale(w, v) for k, v in tree.items()}
        if isinstance(tree, tuple):
            return tuple(scale(w, v) for v in tree)
        return tree * w

    def add(a: Any, b: Any) -> Any:
        if isinstance(a, dict):
            return {k: add(a[k], b[k]) for k in a}
        if isinstance(a, tuple):
            return tuple(add(x, y) for x, y in zip(a, b, strict=True))
        return a + b

    total = None
    for w, tree in terms:
        part = tree if len(terms) == 1 else scale(w, tree)
        total = part if total is None else add(total, part)
    return total


def first_order(fn: Callable[..., torch.Tensor], problem: BilevelProblem) -> Callable[..., tuple[Params, torch.Tensor]]:
    """``torch.func.grad_and_value(fn)`` (in the first argument, a parameter dict; the batch
    is the last argument), or the same by ``torch.autograd`` when the problem's losses
    recompute activations (``problem.checkpointed``), which ``torch.func`` cannot run
    through; over ``problem.chunks`` parts of the batch, one at a time."""
    base = _autograd_first_order(fn) if problem.checkpointed else grad_and_value(fn)

    def chunked(params: Params, *rest: Any) -> tuple[Params, torch.Tensor]:
        *head, batch = rest
        return _weighted_sum([(w, base(params, *head, part)) for w, part in batch_chunks(batch, problem.chunks)])

    return chunked


def _autograd_first_order(fn: Callable[..., torch.Tensor]) -> Callable[..., tuple[Params, torch.Tensor]]:
    """``grad_and_value`` by ``torch.autograd`` (runs through recomputed activations)."""

    def by_autograd(params: Params, *rest: Any) -> tuple[Params, torch.Tensor]:
        leaves = {k: v.detach().requires_grad_() for k, v in params.items()}
        with torch.enable_grad():
            value = fn(leaves, *rest)
            grads = torch.autograd.grad(value, list(leaves.values()), allow_unused=True)
        out = {k: torch.zeros_like(v) if g is None else g for (k, v), g in zip(leaves.items(), grads, strict=True)}
        return out, value.detach()

    return by_autograd


def check_checkpointed(problem: BilevelProblem, method: str, engine: str) -> None:
    """Forward-mode products cannot run through recomputed activations."""
    if problem.checkpointed and method == "jvp":
        raise ValueError(
            f"{engine}: activation checkpointing needs hvp='double_backward' (forward-mode AD cannot "
            "run through recomputed activations)"
        )


@dataclass
class Trajectory:
    """The inner unroll without any graph. ``thetas[s]``, ``states[s]``, ``grads[s]`` are the
    inputs of step ``s`` (kept only with ``keep=True``); ``theta`` / ``state`` the result."""

    theta: Params
    state: State
    losses: list[float] = field(default_factory=list)
    thetas: list[Params] = field(default_factory=list)
    states: list[State] = field(default_factory=list)
    grads: list[Params] = field(default_factory=list)


def unroll(
    problem: BilevelProblem, theta: Params, eta: Params, *, keep: bool = False
) -> Trajectory:
    """Run the S inner steps from ``theta`` with fixed ``eta``; no autograd graph is kept."""
    opt = from_problem(problem)
    theta = {k: v.detach() for k, v in theta.items()}
    eta = {k: v.detach() for k, v in eta.items()}
    traj = Trajectory(theta=theta, state=initial_state(problem, opt, theta))
    for s, batch in enumerate(problem.inner_batches):
        g, loss = first_order(problem.inner_loss, problem)(traj.theta, eta, batch)
        traj.losses.append(float(loss))
        if keep:
            traj.thetas.append(traj.theta)
            traj.states.append(traj.state)
            traj.grads.append(g)
        with torch.no_grad():
            traj.theta, traj.state = opt.step(traj.theta, traj.state, g, problem.inner_step + s + 1)
    return traj


HVP_METHODS = ("jvp", "double_backward")


def hvp(
    inner_loss: Callable[..., torch.Tensor],
    theta: Params,
    eta: Params,
    batch: Any,
    v: Params,
    method: str = "jvp",
    chunks: int = 1,
) -> Params:
    """``H_theta theta L_in(theta, eta; batch) v``: forward-over-reverse (``"jvp"``, the jvp
    of the gradient) or reverse-over-reverse (``"double_backward"``); over ``chunks`` parts
    of the batch, one at a time (:func:`batch_chunks`)."""
    if chunks > 1:
        return _weighted_sum([(w, hvp(inner_loss, theta, eta, part, v, method))
                              for w, part in batch_chunks(batch, chunks)])
    if method == "jvp":
        return jvp(lambda th: grad(inner_loss)(th, eta, batch), (theta,), (v,))[1]
    return _double_backward(inner_loss, theta, eta, batch, v, wrt_eta=False)[0]


def mixed_products(
    inner_loss: Callable[..., torch.Tensor],
    theta: Params,
    eta: Params,
    batch: Any,
    v: Params,
    method: str = "jvp",
    chunks: int = 1,
) -> tuple[Params, Params]:
    """``(H_theta theta L_in v, (d/d eta grad_theta L_in)^T v)``.

    ``"jvp"``: one forward-over-reverse pass, the jvp in ``theta`` along ``v`` of the joint
    gradient ``(grad_theta, grad_eta)`` (the joint Hessian is symmetric, so the tangent of
    ``grad_eta`` along ``theta`` is the transposed mixed block applied to ``v``).
    ``"double_backward"``: the gradient of ``<grad_theta L_in, v>`` in ``(theta, eta)``.
    Over ``chunks`` parts of the batch, one at a time (:func:`batch_chunks`).
    """
    if chunks > 1:
        return _weighted_sum([(w, mixed_products(inner_loss, theta, eta, part, v, method))
                              for w, part in batch_chunks(batch, chunks)])
    if method == "jvp":

        def joint_grad(th: Params) -> tuple[Params, Params]:
            return grad(inner_loss, argnums=(0, 1))(th, eta, batch)

        return jvp(joint_grad, (theta,), (v,))[1]
    return _double_backward(inner_loss, theta, eta, batch, v, wrt_eta=True)


def _double_backward(
    inner_loss: Callable[..., torch.Tensor],
    theta: Params,
    eta: Params,
    batch: Any,
    v: Params,
    wrt_eta: bool,
) -> tuple[Params, Params]:
    th = {k: t.detach().requires_grad_() for k, t in theta.items()}
    et = {k: t.detach().requires_grad_(wrt_eta) for k, t in eta.items()}
    with torch.enable_grad():
        loss = inner_loss(th, et, batch)
        gs = torch.autograd.grad(loss, list(th.values()), create_graph=True, allow_unused=True)
        dot = sum(
            ((g * v[k]).sum() for k, g in zip(th, gs, strict=True) if g is not None),
            start=loss.new_zeros(()),
        )
        wrt = list(th.values()) + (list(et.values()) if wrt_eta else [])
        out = torch.autograd.grad(dot, wrt, allow_unused=True) if dot.requires_grad else None
    grads: tuple[torch.Tensor | None, ...] = (None,) * len(wrt) if out is None else tuple(out)
    fill = [torch.zeros_like(t) if o is None else o for t, o in zip(wrt, grads, strict=True)]
    n = len(th)
    h_eta = dict(zip(et, fill[n:], strict=True)) if wrt_eta else {}
    return dict(zip(th, fill[:n], strict=True)), h_eta


def _zeros(tree: Params) -> Params:
    return {k: torch.zeros_like(v) for k, v in tree.items()}


def tree_add(a: Params, b: Params, scale: float = 1.0) -> Params:
    return {k: a[k] + scale * b[k] for k in a}
