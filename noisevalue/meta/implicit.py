"""Implicit-function-theorem meta-gradient (the paper's Theorem 4.1).

At ``theta_S`` (the S inner steps, run without any graph)::

    grad_eta = -(d/d eta grad_theta L_in)^T (H + damping * I)^{-1} grad_theta L_val

with ``H`` the Hessian of the inner loss in ``theta``. ``L_in`` here is the mean of the
inner loss over the S inner batches (the objective ``theta_S`` was trained on;
``hessian_batches="last"`` uses only the last batch, S times cheaper); the products are
accumulated batch by batch, so memory does not depend on S.

Hessian-vector products are forward-over-reverse (``jvp`` of ``grad``, ``hvp="jvp"``): one
first-order graph plus its tangents, no double-backward graph; ``hvp="double_backward"``
uses reverse-over-reverse instead. The linear system is solved by

* ``"cg"``: conjugate gradient on the damped system (stops early at ``tol`` or on
  non-positive curvature, reported as ``info["negative_curvature"]``: add damping);
* ``"normal_cg"``: CG on the normal equations ``A^2 x = A b`` (``A`` symmetric but possibly
  indefinite; two products per iteration, slower convergence);
* ``"neumann"``: the truncated series ``x = alpha * sum_j (I - alpha A)^j b``, which is
  what ``iterations`` unrolled SGD steps with learning rate ``alpha`` compute near an
  optimum; ``alpha`` defaults to the inner learning rate and needs ``alpha < 2 / ||A||``.

Solver arithmetic is float64 for float64 parameters and float32 otherwise (half precision
is upcast). ``info["residual"]`` is the true relative residual ``||A x - b|| / ||b||`` (one
extra product) and ``info["iterations"]`` the iterations run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from noisevalue.interfaces import BilevelProblem, MetaGradient, MetaOptimizer, Params
from noisevalue.meta.inner import (
    HVP_METHODS,
    check_checkpointed,
    first_order,
    hvp,
    mixed_products,
    unroll,
)
from noisevalue.meta.problem import meta_attention

__all__ = ["Implicit"]

SOLVERS = ("cg", "normal_cg", "neumann")
Operator = Callable[[torch.Tensor], torch.Tensor]


class Implicit(MetaOptimizer):
    """Theorem 4.1 meta-gradient at ``theta_S``. See the module docstring for the options."""

    def __init__(
        self,
        solver: str = "cg",
        iterations: int = 20,
        damping: float = 0.0,
        tol: float = 1e-10,
        neumann_alpha: float | None = None,
        hessian_batches: str = "all",
        hvp: str = "jvp",
    ) -> None:
        if solver not in SOLVERS:
            raise ValueError(f"Implicit: solver must be one of {SOLVERS}, got {solver!r}")
        if iterations < 1 or damping < 0 or tol < 0:
            raise ValueError("Implicit: needs iterations >= 1, damping >= 0 and tol >= 0")
        if neumann_alpha is not None and neumann_alpha <= 0:
            raise ValueError(f"Implicit: neumann_alpha must be > 0, got {neumann_alpha}")
        if hessian_batches not in ("all", "last"):
            raise ValueError(
                f"Implicit: hessian_batches must be 'all' or 'last', got {hessian_batches!r}"
            )
        if hvp not in HVP_METHODS:
            raise ValueError(f"Implicit: hvp must be one of {HVP_METHODS}, got {hvp!r}")
        self.hvp = hvp
        self.solver = solver
        self.iterations = iterations
        self.damping = damping
        self.tol = tol
        self.neumann_alpha = neumann_alpha
        self.hessian_batches = hessian_batches

    @property
    def supports_checkpointing(self) -> bool:
        return self.hvp == "double_backward"

    def meta_gradient(self, problem: BilevelProblem, theta: Params, eta: Params) -> MetaGradient:
        if not problem.inner_batches:
            raise ValueError("Implicit: the problem has no inner batches to define L_in")
        check_checkpointed(problem, self.hvp, "Implicit")
        with meta_attention(problem):
            eta = {k: v.detach() for k, v in eta.items()}
            traj = unroll(problem, theta, eta)
            th = traj.theta
            g_val, val = first_order(problem.outer_loss, problem)(th, problem.val_batch)
            batches = problem.inner_batches
            if self.hessian_batches == "last":
                batches = batches[-1:]
            flat = _Flat(th)

            def matvec(x: torch.Tensor) -> torch.Tensor:
                v = flat.unflatten(x)
                out = flat.zeros()
                for batch in batches:
                    out = out + flat.flatten(hvp(problem.inner_loss, th, eta, batch, v, self.hvp, problem.chunks))
                return out / len(batches) + self.damping * x

            b = flat.flatten(g_val)
            x, iters, info = self._solve(matvec, b, problem.inner_lr)
            bnorm = b.norm()
            res = (matvec(x) - b).norm() / bnorm if bnorm > 0 else bnorm
            xs = flat.unflatten(x)
            grad = {k: torch.zeros_like(v) for k, v in eta.items()}
            for batch in batches:
                _, m = mixed_products(problem.inner_loss, th, eta, batch, xs, self.hvp, problem.chunks)
                grad = {k: grad[k] - m[k] / len(batches) for k in grad}
        info.update(residual=float(res), iterations=float(iters))
        if traj.losses:
            info.update(inner_loss_first=traj.losses[0], inner_loss_last=traj.losses[-1])
        return MetaGradient(grad, th, float(val), info, inner_state=traj.state)

    def _solve(
        self, matvec: Operator, b: torch.Tensor, inner_lr: float
    ) -> tuple[torch.Tensor, int, dict[str, float]]:
        if self.solver == "neumann":
            alpha = self.neumann_alpha if self.neumann_alpha is not None else inner_lr
            p, x = b, b
            for _ in range(self.iterations - 1):
                p = p - alpha * matvec(p)
                x = x + p
            return alpha * x, self.iterations, {}
        if self.solver == "normal_cg":
            return _cg(lambda v: matvec(matvec(v)), matvec(b), self.iterations, self.tol)
        return _cg(matvec, b, self.iterations, self.tol)


def _cg(
    matvec: Operator, b: torch.Tensor, iterations: int, tol: float
) -> tuple[torch.Tensor, int, dict[str, float]]:
    """Conjugate gradient from x = 0; stops at ``||r|| <= tol * ||b||`` or on ``p^T A p <= 0``."""
    x = torch.zeros_like(b)
    r, p = b, b
    rs = r.dot(r)
    stop = (tol * b.norm()) ** 2
    done, negative = 0, 0.0
    for _ in range(iterations):
        if rs <= stop:
            break
        ap = matvec(p)
        curvature = p.dot(ap)
        if curvature <= 0:
            negative = 1.0
            break
        alpha = rs / curvature
        x = x + alpha * p
        r = r - alpha * ap
        rs_new = r.dot(r)
        p = r + (rs_new / rs) * p
        rs = rs_new
        done += 1
    return x, done, {"negative_curvature": negative}


class _Flat:
    """Flattens a parameter dict into one solver vector (float32 or wider) and back."""

    def __init__(self, like: Params) -> None:
        self.like = like
        dtypes = [v.dtype for v in like.values()]
        self.dtype = torch.float64 if torch.float64 in dtypes else torch.float32
        self.device = next(iter(like.values())).device

    def flatten(self, tree: Params) -> torch.Tensor:
        return torch.cat([tree[k].reshape(-1).to(self.dtype) for k in self.like])

    def unflatten(self, vec: torch.Tensor) -> Params:
        out, i = {}, 0
        for k, v in self.like.items():
            out[k] = vec[i : i + v.numel()].view_as(v).to(v.dtype)
            i += v.numel()
        return out

    def zeros(self) -> torch.Tensor:
        n = sum(v.numel() for v in self.like.values())
        return torch.zeros(n, dtype=self.dtype, device=self.device)
