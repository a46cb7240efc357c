"""Blocked attention against PyTorch's math kernel: values, gradients, double backward,
forward-mode AD and the forward-over-reverse products the meta-gradient engines take, in
float64; plus finite-difference checks (gradcheck / gradgradcheck / forward AD)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue.attention import blocked_attention, blocked_sdpa

TOL = dict(rtol=1e-10, atol=1e-12)


def _qkv(seed: int = 0, m: int = 7, n: int = 9, d: int = 4, e: int = 5):
    g = torch.Generator().manual_seed(seed)
    shape = (2, 3)
    q = torch.randn(*shape, m, d, generator=g, dtype=torch.float64)
    k = torch.randn(*shape, n, d, generator=g, dtype=torch.float64)
    v = torch.randn(*shape, n, e, generator=g, dtype=torch.float64)
    return q, k, v


def _math(q, k, v, scale=None):
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(q, k, v, scale=scale)


@pytest.mark.parametrize("block", [1, 3, 7, 64])
def test_value_and_gradient_match_math_kernel(block):
    q, k, v = (t.requires_grad_() for t in _qkv())
    w = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    out = blocked_attention(q, k, v, block=block)
    ref = _math(q, k, v)
    torch.testing.assert_close(out, ref, **TOL)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w).sum(), (q, k, v))
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_scale_is_honoured():
    q, k, v = _qkv(1)
    torch.testing.assert_close(blocked_attention(q, k, v, scale=0.3, block=2), _math(q, k, v, 0.3), **TOL)


def test_finite_differences_first_second_and_forward_mode():
    q, k, v = (t.requires_grad_() for t in _qkv(2, m=4, n=5, d=3, e=2))

    def fn(q, k, v):
        return blocked_attention(q, k, v, block=3)

    assert torch.autograd.gradcheck(fn, (q, k, v), check_forward_ad=True)
    assert torch.autograd.gradgradcheck(fn, (q, k, v))


def test_double_backward_matches_math_kernel():
    """Reverse over reverse, as the unrolled reverse engine and hvp=double_backward take it."""
    q, k, v = (t.requires_grad_() for t in _qkv(3))
    w = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    u = [torch.randn_like(t) for t in (q, k, v)]

    def second(f):
        g = torch.autograd.grad((f(q, k, v) * w).pow(2).sum(), (q, k, v), create_graph=True)
        dot = sum((a * b).sum() for a, b in zip(g, u, strict=True))
        return torch.autograd.grad(dot, (q, k, v))

    got = second(lambda *a: blocked_attention(*a, block=2))
    want = second(_math)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_forward_over_reverse_matches_math_kernel():
    """``torch.func.jvp`` of ``torch.func.grad``, as the mixed and implicit engines take it."""
    q, k, v = _qkv(4)
    w = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    tangents = tuple(torch.randn_like(t) for t in (q, k, v))

    def products(f):
        def g(q, k, v):
            return grad(lambda *a: (f(*a) * w).pow(2).sum(), argnums=(0, 1, 2))(q, k, v)

        return jvp(g, (q, k, v), tangents)

    (g1, t1), (g2, t2) = products(lambda *a: blocked_attention(*a, block=3)), products(_math)
    for a, b in zip(g1 + t1, g2 + t2, strict=True):
        torch.testing.assert_close(a, b, **TOL)


def test_third_derivative_raises():
    q, k, v = (t.requires_grad_() for t in _qkv(5, m=3, n=3))
    g = torch.autograd.grad(blocked_attention(q, k, v, block=2).pow(2).sum(), q, create_graph=True)[0]
    with pytest.raises(RuntimeError, match="third derivatives"):
        torch.autograd.grad(g.pow(2).sum(), q, create_graph=True)


def test_sdpa_switches_inside_the_context_only():
    from noisevalue import attention

    q, k, v = (t.requires_grad_() for t in _qkv(6))
    with blocked_sdpa(4):
        inside = attention.sdpa(q, k, v)
        with blocked_sdpa(2):
            assert attention._BLOCK == 2
        assert attention._BLOCK == 4
    outside = attention.sdpa(q, k, v)
    assert type(inside.grad_fn).__name__ == "_AttentionBackward" and attention._BLOCK is None
    assert type(outside.grad_fn).__name__ != "_AttentionBackward"
    torch.testing.assert_close(inside, outside, **TOL)
    with pytest.raises(ValueError, match="block must be >= 1"):
        with blocked_sdpa(0):
            pass


def test_self_attention_matches_timm_and_loads_its_weights():
    from timm.models.vision_transformer import Attention

    from noisevalue.attention import SelfAttention

    torch.manual_seed(0)
    reference = Attention(12, num_heads=3, qkv_bias=True).double()
    ours = SelfAttention(12, num_heads=3).double()
    ours.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(2, 5, 12, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        torch.testing.assert_close(ours(x), reference(x), **TOL)
        with blocked_sdpa(2):
            torch.testing.assert_close(ours(x), reference(x), **TOL)
