"""Query-blocked attention with exact, recomputing first and second derivatives.

The meta-gradient engines differentiate the backbone and the rater twice: reverse over
reverse (the unrolled and implicit engines' double backward) or forward over reverse (the
jvp of a gradient). PyTorch's fused attention kernels support neither, and the math kernel
keeps every ``[queries, keys]`` attention matrix of every head alive, for the backward pass
and again, several times over, in the second-order graph.

:func:`blocked_attention` computes ``softmax(scale * q k^T) v`` over blocks of ``block``
queries: a block sees all keys, so its softmax rows are complete and no running maximum is
needed. Nothing but ``q``, ``k`` and ``v`` is saved. Each derivative recomputes the block's
probabilities when it needs them:

* the backward pass is itself an autograd function (:class:`_AttentionGrad`) of
  ``(q, k, v, grad_out)``, so a double backward goes through it block by block too (its
  own backward recomputes the block's first-order graph and differentiates it);
* both functions have forward-mode rules (``jvp``), written in closed form, so
  ``torch.func.jvp`` of a ``torch.func.grad`` runs through them.

Third derivatives are not supported (no meta-gradient engine takes one); asking for one
raises. The backbones and raters compute attention through :func:`sdpa`, which runs
blocked attention inside :func:`blocked_sdpa` and PyTorch's kernel otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["blocked_attention", "blocked_sdpa", "sdpa", "SelfAttention"]


def _blocks(m: int, block: int) -> Iterator[slice]:
    for start in range(0, m, block):
        yield slice(start, min(start + block, m))


def _probs(qb: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """Softmax rows of one query block over all keys, ``[..., b, N]``."""
    return torch.softmax((qb @ k.transpose(-2, -1)) * scale, dim=-1)


def _block_grads(
    qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dob: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One query block's share of ``(dq, dk, dv)`` given ``grad_out`` rows ``dob``, in plain
    differentiable operations."""
    p = _probs(qb, k, scale)
    dp = dob @ v.transpose(-2, -1)
    ds = p * (dp - (dp * p).sum(-1, keepdim=True))
    return (ds @ k) * scale, (ds.transpose(-2, -1) @ qb) * scale, p.transpose(-2, -1) @ dob


def _prob_tangent(
    p: torch.Tensor, qb: torch.Tensor, k: torch.Tensor, tqb: torch.Tensor | None,
    tk: torch.Tensor | None, scale: float,
) -> torch.Tensor | None:
    """Tangent of the block's softmax rows along ``(tq, tk)``; None when both are None."""
    ts = None
    if tqb is not None:
        ts = tqb @ k.transpose(-2, -1)
    if tk is not None:
        term = qb @ tk.transpose(-2, -1)
        ts = term if ts is None else ts + term
    if ts is None:
        return None
    ts = ts * scale
    return p * (ts - (p * ts).sum(-1, keepdim=True))


def _sum(*terms: torch.Tensor | None) -> torch.Tensor | None:
    out = None
    for term in terms:
        if term is not None:
            out = term if out is None else out + term
    return out


class _AttentionGrad(torch.autograd.Function):
    """``(q, k, v, grad_out) -> (dq, dk, dv)`` of attention, block by block."""

    @staticmethod
    def forward(q, k, v, do, scale, block):  # type: ignore[override]
        dq, dk, dv = [], None, None
        for rows in _blocks(q.shape[-2], block):
            g_q, g_k, g_v = _block_grads(q[..., rows, :], k, v, do[..., rows, :], scale)
            dq.append(g_q)
            dk, dv = _sum(dk, g_k), _sum(dv, g_v)
        return torch.cat(dq, dim=-2), dk, dv

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, do, scale, block = inputs
        ctx.save_for_backward(q, k, v, do)
        ctx.save_for_forward(q, k, v, do)
        ctx.scale, ctx.block = scale, block

    @staticmethod
    def backward(ctx: Any, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor) -> Any:
        q, k, v, do = ctx.saved_tensors
        if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, do, gq, gk, gv)):
            raise RuntimeError("blocked attention: third derivatives are not supported")
        a_q, a_do, a_k, a_v = [], [], None, None
        kl, vl = k.detach().requires_grad_(), v.detach().requires_grad_()
        for rows in _blocks(q.shape[-2], ctx.block):
            qb = q[..., rows, :].detach().requires_grad_()
            dob = do[..., rows, :].detach().requires_grad_()
            with torch.enable_grad():
                g_q, g_k, g_v = _block_grads(qb, kl, vl, dob, ctx.scale)
                dot = (g_q * gq[..., rows, :]).sum() + (g_k * gk).sum() + (g_v * gv).sum()
                b_q, b_k, b_v, b_do = torch.autograd.grad(dot, (qb, kl, vl, dob))
            a_q.append(b_q)
            a_do.append(b_do)
            a_k, a_v = _sum(a_k, b_k), _sum(a_v, b_v)
        return torch.cat(a_q, dim=-2), a_k, a_v, torch.cat(a_do, dim=-2), None, None

    @staticmethod
    def jvp(ctx: Any, tq: Any, tk: Any, tv: Any, tdo: Any, *_: Any) -> Any:
        q, k, v, do = ctx.saved_tensors
        scale = ctx.scale
        t_dq, t_dk, t_dv = [], None, None
        for rows in _blocks(q.shape[-2], ctx.block):
            qb, dob = q[..., rows, :], do[..., rows, :]
            tqb = None if tq is None else tq[..., rows, :]
            tdob = None if tdo is None else tdo[..., rows, :]
            p = _probs(qb, k, scale)
            tp = _prob_tangent(p, qb, k, tqb, tk, scale)
            dp = dob @ v.transpose(-2, -1)
            r = (dp * p).sum(-1, keepdim=True)
            ds = p * (dp - r)
            tdp = _sum(
                None if tdob is None else tdob @ v.transpose(-2, -1),
                None if tv is None else dob @ tv.transpose(-2, -1),
            )
            tr = _sum(
                None if tdp is None else (tdp * p).sum(-1, keepdim=True),
                None if tp is None else (dp * tp).sum(-1, keepdim=True),
            )
            tds = _sum(
                None if tp is None else tp * (dp - r),
                None if tdp is None or tr is None else p * (tdp - tr),
            )
            part_q = _sum(None if tds is None else tds @ k, None if tk is None else ds @ tk)
            t_dq.append(torch.zeros_like(qb) if part_q is None else part_q * scale)
            part_k = _sum(
                None if tds is None else tds.transpose(-2, -1) @ qb,
                None if tqb is None else ds.transpose(-2, -1) @ tqb,
            )
            t_dk = _sum(t_dk, None if part_k is None else part_k * scale)
            t_dv = _sum(
                t_dv,
                None if tp is None else tp.transpose(-2, -1) @ dob,
                None if tdob is None else p.transpose(-2, -1) @ tdob,
            )
        return (
            torch.cat(t_dq, dim=-2),
            torch.zeros_like(k) if t_dk is None else t_dk,
            torch.zeros_like(v) if t_dv is None else t_dv,
        )


class _Attention(torch.autograd.Function):
    """``softmax(scale * q k^T) v`` block by block, saving only ``q, k, v``."""

    @staticmethod
    def forward(q, k, v, scale, block):  # type: ignore[override]
        return torch.cat([_probs(q[..., rows, :], k, scale) @ v for rows in _blocks(q.shape[-2], block)], dim=-2)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Any) -> None:
        q, k, v, scale, block = inputs
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)
        ctx.scale, ctx.block = scale, block

    @staticmethod
    def backward(ctx: Any, do: torch.Tensor) -> Any:
        q, k, v = ctx.saved_tensors
        dq, dk, dv = _AttentionGrad.apply(q, k, v, do, ctx.scale, ctx.block)
        return dq, dk, dv, None, None

    @staticmethod
    def jvp(ctx: Any, tq: Any, tk: Any, tv: Any, *_: Any) -> Any:
        q, k, v = ctx.saved_tensors
        out = []
        for rows in _blocks(q.shape[-2], ctx.block):
            qb = q[..., rows, :]
            p = _probs(qb, k, ctx.scale)
            tp = _prob_tangent(p, qb, k, None if tq is None else tq[..., rows, :], tk, ctx.scale)
            term = _sum(None if tp is None else tp @ v, None if tv is None else p @ tv)
            out.append(q.new_zeros(*qb.shape[:-1], v.shape[-1]) if term is None else term)
        return torch.cat(out, dim=-2)


def blocked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, block: int = 64
) -> torch.Tensor:
    """``softmax(scale * q k^T) v`` for ``q`` ``[..., M, D]``, ``k`` ``[..., N, D]``, ``v``
    ``[..., N, E]`` (``scale`` defaults to ``1 / sqrt(D)``), over blocks of ``block``
    queries, with recomputing first- and second-order derivatives and forward-mode rules."""
    if block < 1:
        raise ValueError(f"blocked_attention: block must be >= 1, got {block}")
    s = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _Attention.apply(q, k, v, s, block)


# queries per block inside :func:`blocked_sdpa`, else None. A plain module global, not a
# thread-local: the autograd engine recomputes checkpointed activations on its own threads.
_BLOCK: int | None = None


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Unmasked attention as every backbone and rater of the package computes it:
    :func:`blocked_attention` inside :func:`blocked_sdpa`, else PyTorch's
    ``scaled_dot_product_attention`` (whose kernel the caller may pin)."""
    if _BLOCK is not None:
        return blocked_attention(q, k, v, block=_BLOCK)
    return F.scaled_dot_product_attention(q, k, v)


@contextmanager
def blocked_sdpa(block: int = 64) -> Iterator[None]:
    """Within the context, :func:`sdpa` runs :func:`blocked_attention` over ``block``
    queries at a time."""
    global _BLOCK
    if block < 1:
        raise ValueError(f"blocked_sdpa: block must be >= 1, got {block}")
    previous, _BLOCK = _BLOCK, block
    try:
        yield
    finally:
        _BLOCK = previous


class SelfAttention(nn.Module):
    """Multi-head self-attention through :func:`sdpa`, with timm's ``Attention`` parameter
    names (``qkv``, ``proj``), so DiT's reference checkpoints load unchanged."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SelfAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.proj(sdpa(q, k, v).transpose(1, 2).reshape(n, length, dim))
