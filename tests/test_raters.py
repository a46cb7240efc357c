"""Dual-stream rater: size, init, equivariance, ablations, purity; the norm rater."""

from __future__ import annotations

import inspect
import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue.errors import ConfigError
from noisevalue.interfaces import Rater
from noisevalue.raters import DualStreamRater, NormRater, dual_stream, dual_stream_tiny

TINY = {"input_size": 8, "in_channels": 1, "num_classes": 10}


def closed_form_count(
    depth=12,
    d=384,
    p=2,
    c=4,
    classes=1000,
    mlp_ratio=4.0,
    freq=256,
    use_timestep=True,
    use_image=True,
    use_label=True,
    per_stream_attention_weights=False,
):
    """Parameter count from the architecture (the frozen pos-embed is a buffer)."""
    streams = 2 if use_image else 1
    hidden = int(d * mlp_ratio)
    patch = streams * (c * p * p * d + d)  # conv kernel = stride = p, with bias
    type_embed = streams * d
    t_embed = (freq * d + d) + (d * d + d) if use_timestep else 0
    y_embed = (classes + 1) * d if use_label and classes > 0 else 0  # + the null label
    const = d if not t_embed and not y_embed else 0
    mlp = (d * hidden + hidden) + (hidden * d + d)  # fc1, fc2
    attn = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, proj
    if per_stream_attention_weights:
        attn *= streams
    ada = d * 6 * streams * d + 6 * streams * d  # one Linear(D, 12 D) for two streams
    block = streams * mlp + attn + ada
    # The head drops the image tokens, so in the last block the image stream is only read
    # (keys and values): no image MLP, no image gates / MLP modulation (4 of its 6 chunks)
    # and, with per-stream projections, no image output projection.
    last = block
    if use_image:
        last -= mlp + 4 * (d * d + d)
        if per_stream_attention_weights:
            last -= d * d + d
    head = d + 1  # the LayerNorm has no affine parameters
    return patch + type_embed + t_embed + y_embed + const + (depth - 1) * block + last + head


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def tiny(seed=0, **kw) -> DualStreamRater:
    torch.manual_seed(seed)
    return dual_stream_tiny(**kw)


def tiny_inputs(n=6, seed=1, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    x0 = torch.randn(n, 1, 8, 8, generator=g).to(dtype)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, 11, (n,), generator=g)  # 10 is the null label
    return noise, t, x0, y


@pytest.fixture(scope="module")
def default_rater():
    torch.manual_seed(0)
    return dual_stream()


def test_default_param_count_matches_closed_form():
    with torch.device("meta"):
        rater = dual_stream()
        per_stream = dual_stream(per_stream_attention_weights=True)
    # Appendix B.1: one attention shared by both streams, per-stream MLPs and modulation:
    # 55.6M (57.4M with the last block's unused image-stream MLP and modulation, which
    # cannot reach the score and are left out).
    assert rater.config["per_stream_attention_weights"] is False
    assert DualStreamRater().config == rater.config  # the class and the factory agree
    assert n_params(rater) == closed_form_count() == 55_615_105
    # SD3's MMDiT layout (per-stream qkv/proj around one joint attention), an option: 62.6M
    assert n_params(per_stream) == closed_form_count(per_stream_attention_weights=True) == 62_563_585
    # The frozen position embedding is a buffer: not learned, not checkpointed.
    assert "pos_embed" not in dict(rater.named_parameters())
    assert "pos_embed" not in rater.state_dict()


@pytest.mark.parametrize(
    "switches",
    [
        {},
        {"use_timestep": False},
        {"use_image": False},
        {"use_image": False, "use_label": False},
        {"use_timestep": False, "use_image": False, "use_label": False},
        {"per_stream_attention_weights": True},
    ],
)
def test_ablation_param_counts(switches):
    with torch.device("meta"):
        rater = dual_stream(**switches)
    assert n_params(rater) == closed_form_count(**switches)


def test_tiny_param_count_and_attributes():
    rater = tiny()
    assert n_params(rater) == closed_form_count(depth=2, d=64, c=1, classes=10)
    assert rater.latent_shape == (1, 8, 8) and rater.num_classes == 10
    assert isinstance(rater, Rater)
    assert rater.config["hidden_size"] == 64 and rater.config["depth"] == 2
    assert DualStreamRater(**rater.config).config == rater.config


def test_xavier_init_everywhere(default_rater):
    linears = [m for m in default_rater.modules() if isinstance(m, nn.Linear)]
    # 12 blocks x (one shared qkv and proj, fc1 x2, fc2 x2, adaLN) - the last block's unused
    # image MLP + timestep MLP + head
    assert len(linears) == 12 * 7 - 2 + 2 + 1
    weights = [lin.weight for lin in linears]
    biases = [lin.bias for lin in linears]
    for emb in (default_rater.noise_embedder, default_rater.image_embedder):
        weights.append(emb.proj.weight.flatten(1))
        biases.append(emb.proj.bias)
    for w in weights:
        fan_out, fan_in = w.shape
        expected = math.sqrt(2.0 / (fan_in + fan_out))
        assert abs(w.std().item() / expected - 1) < 0.1, w.shape
    assert all(torch.count_nonzero(b) == 0 for b in biases)
    # Not adaLN-Zero: the modulation and the head are not zero.
    assert default_rater.blocks[0].adaLN_modulation[1].weight.abs().max() > 0
    assert default_rater.head.weight.abs().max() > 0


def test_scores_differ_at_init():
    # The default architecture on 16x16 latents (64 tokens per stream) to stay fast.
    torch.manual_seed(0)
    rater = dual_stream(input_size=16)
    g = torch.Generator().manual_seed(3)
    n = 16
    x0 = torch.randn(1, 4, 16, 16, generator=g).expand(n, -1, -1, -1)
    noise = torch.randn(n, 4, 16, 16, generator=g)
    t = torch.full((n,), 500)
    y = torch.full((n,), 7)
    with torch.no_grad():
        scores = rater(noise, t, x0, y)
    assert scores.shape == (n,) and scores.dtype == torch.float32
    assert torch.isfinite(scores).all()
    assert scores.std().item() > 1e-3  # one group: candidates are told apart at init
    assert scores.unique().numel() == n


def test_tiny_scores_differ_at_init():
    rater = tiny()
    noise, t, x0, y = tiny_inputs(16)
    x0, t, y = x0[:1].expand(16, -1, -1, -1), t[:1].expand(16), y[:1].expand(16)
    with torch.no_grad():
        scores = rater(noise, t, x0, y)
    assert scores.std().item() > 1e-3


def test_permutation_equivariance_within_groups():
    rater = tiny()
    groups, k = 3, 5
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(groups, 1, 8, 8, generator=g)
    t = torch.tensor([10, 500, 999])
    y = torch.tensor([0, 3, 10])
    cands = torch.randn(groups, k, 1, 8, 8, generator=g)

    def score(c):
        flat = c.reshape(groups * k, 1, 8, 8)
        rep = lambda v: v.repeat_interleave(k, dim=0)  # noqa: E731
        with torch.no_grad():
            return rater(flat, rep(t), rep(x0), rep(y)).reshape(groups, k)

    base = score(cands)
    perm = torch.stack([torch.randperm(k, generator=g) for _ in range(groups)])
    permuted = torch.gather(cands, 1, perm[:, :, None, None, None].expand_as(cands))
    torch.testing.assert_close(score(permuted), torch.gather(base, 1, perm), rtol=0, atol=1e-6)
    # No leakage across the batch either: one sample alone scores the same.
    with torch.no_grad():
        alone = rater(cands[1, 2:3], t[1:2], x0[1:2], y[1:2])
    torch.testing.assert_close(alone, base[1, 2:3], rtol=0, atol=1e-6)


def test_full_rater_reads_every_input():
    rater = tiny()
    noise, t, x0, y = tiny_inputs()
    with torch.no_grad():
        base = rater(noise, t, x0, y)
        changed = {
            "noise": rater(noise.flip(0), t, x0, y),
            "x0": rater(noise, t, -x0, y),
            "t": rater(noise, (t + 300) % 1000, x0, y),
            "y": rater(noise, t, x0, (y + 1) % 11),
        }
    for name, out in changed.items():
        assert (out - base).abs().max().item() > 1e-4, name


def test_no_image_stream():
    rater = tiny(use_image=False)
    names = [n for n, _ in rater.named_parameters()]
    assert not any("image" in n for n in names)
    assert rater.image_embedder is None and rater.image_type_embed is None
    assert rater.blocks[0].adaLN_modulation[1].out_features == 6 * 64
    assert n_params(rater) == closed_form_count(depth=2, d=64, c=1, classes=10, use_image=False)
    noise, t, x0, y = tiny_inputs()
    with torch.no_grad():
        base = rater(noise, t, x0, y)
        assert torch.equal(rater(noise, t, torch.randn_like(x0) * 5, y), base)
        assert torch.equal(rater(noise, t, None, y), base)
        assert (rater(noise, (t + 300) % 1000, x0, y) - base).abs().max() > 1e-4


def test_no_timestep():
    rater = tiny(use_timestep=False)
    assert rater.t_embedder is None
    assert not any(n.startswith("t_embedder") for n, _ in rater.named_parameters())
    noise, t, x0, y = tiny_inputs()
    with torch.no_grad():
        base = rater(noise, t, x0, y)
        assert torch.equal(rater(noise, (t + 300) % 1000, x0, y), base)
        assert (rater(noise, t, x0, (y + 1) % 11) - base).abs().max() > 1e-4


def test_no_label():
    rater = tiny(use_label=False)
    assert rater.y_embedder is None and not rater.uses_labels
    noise, t, x0, y = tiny_inputs()
    with torch.no_grad():
        base = rater(noise, t, x0, y)
        assert torch.equal(rater(noise, t, x0, (y + 1) % 11), base)
        assert torch.equal(rater(noise, t, x0, None), base)


def test_noise_only_uses_a_constant_condition():
    rater = tiny(use_timestep=False, use_image=False, use_label=False)
    names = {n for n, _ in rater.named_parameters()}
    assert "cond_const" in names
    assert not any(n.startswith(("t_embedder", "y_embedder", "image")) for n in names)
    noise, t, x0, y = tiny_inputs()
    with torch.no_grad():
        base = rater(noise, t, x0, y)
        assert torch.equal(rater(noise, t.flip(0), -x0, y.flip(0)), base)
        assert base.std() > 1e-3


def test_unconditional_rater():
    rater = tiny(num_classes=0)
    assert rater.y_embedder is None and rater.num_classes == 0
    noise, t, x0, _ = tiny_inputs()
    with torch.no_grad():
        assert rater(noise, t, x0, None).shape == (6,)


def test_bad_config_and_inputs():
    with pytest.raises(ConfigError, match="not divisible by patch size"):
        dual_stream_tiny(input_size=9)
    with pytest.raises(ConfigError, match="heads"):
        dual_stream_tiny(num_heads=3)
    rater = tiny()
    noise, t, x0, y = tiny_inputs()
    with pytest.raises(ValueError, match="needs labels"):
        rater(noise, t, x0, None)
    with pytest.raises(ValueError, match=r"expects noise \[N, 1, 8, 8\]"):
        rater(torch.randn(2, 1, 16, 16), t[:2], x0[:2], y[:2])
    with pytest.raises(ValueError, match="x0"):
        rater(noise, t, None, y)


def test_factories_have_explicit_keywords():
    for factory in (dual_stream, dual_stream_tiny):
        params = inspect.signature(factory).parameters
        assert not any(p.kind is p.VAR_KEYWORD for p in params.values())
        assert set(params) == set(inspect.signature(DualStreamRater).parameters)


def test_pure_function_grad_jvp_double_backward():
    rater = tiny()
    noise, t, x0, y = tiny_inputs()
    params = {k: v.detach() for k, v in rater.named_parameters()}

    def total(p):
        return torch.func.functional_call(rater, p, (noise, t, x0, y)).sum()

    with sdpa_kernel(SDPBackend.MATH):
        func_grads = torch.func.grad(total)(params)
        rater.zero_grad()
        rater(noise, t, x0, y).sum().backward()
        for name, p in rater.named_parameters():
            torch.testing.assert_close(func_grads[name], p.grad, rtol=1e-5, atol=1e-6)
        assert sum(g.abs().sum() for g in func_grads.values()) > 0

        # Forward-mode: the jvp equals the directional derivative from reverse mode.
        g = torch.Generator().manual_seed(5)
        tangent = {k: torch.randn(v.shape, generator=g) for k, v in params.items()}
        _, jvp_out = torch.func.jvp(total, (params,), (tangent,))
        expected = sum((func_grads[k] * tangent[k]).sum() for k in params)
        torch.testing.assert_close(jvp_out, expected, rtol=1e-4, atol=1e-5)

        # Double backward: the gradient of the squared gradient norm.
        def grad_norm(p):
            grads = torch.func.grad(total)(p)
            return sum((v**2).sum() for v in grads.values())

        second = torch.func.grad(grad_norm)(params)
        assert all(torch.isfinite(v).all() for v in second.values())
        assert sum(v.abs().sum() for v in second.values()) > 0
    # Inputs are untouched.
    assert torch.equal(noise, tiny_inputs()[0])


def test_float64():
    rater = tiny().double()
    noise, t, x0, y = tiny_inputs(dtype=torch.float64)
    with torch.no_grad():
        out = rater(noise, t, x0, y)
        out32 = tiny()(*tiny_inputs())
    assert out.dtype == torch.float64
    torch.testing.assert_close(out.float(), out32, rtol=1e-4, atol=1e-5)


def test_norm_rater():
    g = torch.Generator().manual_seed(6)
    noise = torch.randn(5, 3, 4, 4, generator=g)
    norms = noise.flatten(1).pow(2).sum(1).sqrt()
    torch.testing.assert_close(NormRater()(noise, None, None, None), norms)
    torch.testing.assert_close(NormRater(sign=-1)(noise, None, None, None), -norms)
    rater = NormRater()
    assert isinstance(rater, Rater) and n_params(rater) == 0
    assert rater.latent_shape is None and rater.num_classes is None
    with pytest.raises(ConfigError, match="sign"):
        NormRater(sign=2)


@pytest.mark.parametrize("per_stream", [False, True])
def test_last_block_context_only_is_the_same_function(per_stream):
    """Dropping the last block's image MLP, gates and queries does not change the noise
    tokens it outputs: compare with a full block carrying the same weights."""
    from noisevalue.raters.dual_stream import DualStreamBlock

    d, streams = 32, ("image", "noise")
    torch.manual_seed(0)
    full = DualStreamBlock(d, 4, 4.0, streams, per_stream)
    lean = DualStreamBlock(d, 4, 4.0, streams, per_stream, context_only=("image",))
    for m in (full, lean):
        for p in m.parameters():
            nn.init.normal_(p, std=0.3)
    lean_ada = lean.adaLN_modulation[1]
    full_ada = full.adaLN_modulation[1]
    with torch.no_grad():
        # full rows: image (6 chunks) then noise (6); lean: image shift/scale, noise (6).
        rows = torch.cat([torch.arange(0, 2 * d), torch.arange(6 * d, 12 * d)])
        lean_ada.weight.copy_(full_ada.weight[rows])
        lean_ada.bias.copy_(full_ada.bias[rows])
        own = dict(lean.named_parameters())
        for name, p in full.named_parameters():
            if name in own and not name.startswith("adaLN"):
                own[name].copy_(p)
    assert n_params(full) - n_params(lean) == (
        (d * 4 * d + 4 * d) + (4 * d * d + d) + 4 * (d * d + d) + (d * d + d) * per_stream
    )
    x = {"image": torch.randn(3, 16, d), "noise": torch.randn(3, 16, d)}
    c = torch.randn(3, d)
    out_full, out_lean = full(x, c), lean(x, c)
    assert set(out_lean) == {"noise"}
    torch.testing.assert_close(out_lean["noise"], out_full["noise"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("switches", [{}, {"per_stream_attention_weights": True}])
def test_every_parameter_gets_a_gradient(switches):
    rater = tiny(**switches)
    noise, t, x0, y = tiny_inputs()
    rater(noise, t, x0, y).sum().backward()
    missing = [n for n, p in rater.named_parameters() if p.grad is None]
    assert missing == []
    dead = [n for n, p in rater.named_parameters() if n != "y_embedder.weight" and not p.grad.any()]
    assert dead == []


@pytest.mark.parametrize("context_only", [False, True])
def test_shared_attention_equals_reference_multihead_attention(context_only):
    """The default joint attention is one multi-head self-attention over the concatenated
    image and noise tokens: torch's reference ``nn.MultiheadAttention`` with the same qkv and
    output weights gives the same outputs (queries of the image stream dropped when it is
    context only, as in the last block)."""
    from noisevalue.raters.dual_stream import JointAttention

    d, heads, streams = 32, 4, ("image", "noise")
    torch.manual_seed(0)
    outputs = ("noise",) if context_only else streams
    attn = JointAttention(d, heads, streams, per_stream_weights=False, outputs=outputs).double()
    reference = nn.MultiheadAttention(d, heads, batch_first=True).double()
    with torch.no_grad():
        reference.in_proj_weight.copy_(attn.qkv.weight)
        reference.in_proj_bias.copy_(attn.qkv.bias)
        reference.out_proj.weight.copy_(attn.proj.weight)
        reference.out_proj.bias.copy_(attn.proj.bias)
    image = torch.randn(3, 16, d, dtype=torch.float64)
    noise = torch.randn(3, 16, d, dtype=torch.float64)
    tokens = torch.cat([image, noise], dim=1)
    expected, _ = reference(tokens, tokens, tokens, need_weights=False)
    got = attn([image, noise])
    want = [expected[:, 16:]] if context_only else [expected[:, :16], expected[:, 16:]]
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


# -- the shared-image-stream variant -------------------------------------------------------
def shared_pair(seed=0, **kw):
    """A joint rater and the shared variant with the same weights (float64)."""
    params = dict(input_size=8, in_channels=1, num_classes=10, hidden_size=32, depth=3, num_heads=2, **kw)
    torch.manual_seed(seed)
    joint = dual_stream_tiny(**params).double()
    shared = dual_stream_tiny(**params, shared_image_stream=True).double()
    shared.load_state_dict(joint.state_dict())  # the same parameters, only the attention pattern differs
    return joint, shared


def grouped_inputs(n=3, k=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 1000, (n,), generator=g),
            torch.randn(n, 1, 8, 8, generator=g, dtype=torch.float64), torch.randint(0, 11, (n,), generator=g))


@pytest.mark.parametrize("per_stream", [False, True])
def test_shared_image_stream_is_joint_attention_with_image_queries_masked_from_noise(monkeypatch, per_stream):
    import sys

    ds = sys.modules["noisevalue.raters.dual_stream"]  # the module (the package exports a function of that name)
    joint, shared = shared_pair(per_stream_attention_weights=per_stream)
    noise, t, x0, y = grouped_inputs()
    n, k = noise.shape[:2]
    got = shared(noise, t, x0, y)
    assert got.shape == (n, k) and shared.grouped and not joint.grouped
    flat = (noise.flatten(0, 1), t.repeat_interleave(k), x0.repeat_interleave(k, 0), y.repeat_interleave(k))
    torch.testing.assert_close(shared(*flat).reshape(n, k), got, rtol=1e-12, atol=1e-12)  # one candidate per row

    real = torch.nn.functional.scaled_dot_product_attention

    def masked(q, kk, v):  # the joint rater's attention with image queries blind to noise keys
        if q.shape[2] == kk.shape[2]:  # image and noise queries (every block but the last)
            half = q.shape[2] // 2
            allowed = torch.ones(q.shape[2], kk.shape[2], dtype=torch.bool)
            allowed[:half, half:] = False
            return real(q, kk, v, attn_mask=allowed)
        return real(q, kk, v)

    reference = joint(*flat).reshape(n, k)
    assert not torch.allclose(reference, got)  # the patterns differ ...
    monkeypatch.setattr(ds, "sdpa", masked)
    torch.testing.assert_close(joint(*flat).reshape(n, k), got, rtol=1e-10, atol=1e-12)  # ... by exactly that


def test_shared_image_stream_costs_less_per_candidate():
    from torch.utils.flop_counter import FlopCounterMode

    joint, shared = shared_pair()
    noise, t, x0, y = grouped_inputs(n=4, k=8)
    flat = (noise.flatten(0, 1), t.repeat_interleave(8), x0.repeat_interleave(8, 0), y.repeat_interleave(8))
    costs = []
    for call in (lambda: joint(*flat), lambda: shared(noise, t, x0, y)):
        with FlopCounterMode(display=False) as counter:
            call()
        costs.append(counter.get_total_flops())
    assert costs[1] < 0.65 * costs[0]  # about half, plus the image stream once per sample (1/k)
    assert sum(p.numel() for p in shared.parameters()) == sum(p.numel() for p in joint.parameters())


def test_grouped_raters_in_selection_and_meta_training():
    from noisevalue.meta.problem import GroupedBatch, group_scores, param_dict
    from noisevalue.selectors import RaterSelector

    _, shared = shared_pair()
    noise, t, x0, y = grouped_inputs(n=5, k=4)
    expected = shared(noise, t, x0, y)
    chunked = RaterSelector(k=4, rater=shared, batch_size=8).scores(x0, y, t, noise)  # 2 samples per call
    torch.testing.assert_close(chunked, expected, rtol=1e-12, atol=1e-12)
    functional = group_scores(shared, param_dict(shared), GroupedBatch(x0, y, t, noise))
    torch.testing.assert_close(functional, expected, rtol=1e-12, atol=1e-12)
    with pytest.raises(ConfigError, match="shared_image_stream needs the image stream"):
        dual_stream_tiny(use_image=False, shared_image_stream=True)


def test_coarse_noise_patches():
    """``noise_patch_size``: the noise on its own, coarser grid (4 tokens of 4x4 on 8x8 beside
    16 image tokens of 2x2), with that grid's sin-cos positions; the explicit default equals
    the implicit one; grouped scoring equals one candidate per row; and the per-candidate
    cost falls to about a quarter (exact FLOP counts)."""
    from torch.utils.flop_counter import FlopCounterMode

    from noisevalue.backbones.dit import get_2d_sincos_pos_embed

    _, shared = shared_pair()
    _, coarse = shared_pair(noise_patch_size=4)
    assert coarse.noise_embedder.proj.kernel_size == (4, 4) and coarse.image_embedder.proj.kernel_size == (2, 2)
    torch.testing.assert_close(coarse.noise_pos_embed[0], get_2d_sincos_pos_embed(32, 2).double())
    torch.testing.assert_close(coarse.pos_embed[0], get_2d_sincos_pos_embed(32, 4).double())
    _, explicit = shared_pair(noise_patch_size=2)
    explicit.load_state_dict(shared.state_dict(), strict=True)
    noise, t, x0, y = grouped_inputs(n=4, k=8)
    torch.testing.assert_close(explicit(noise, t, x0, y), shared(noise, t, x0, y), rtol=0, atol=0)

    got = coarse(noise, t, x0, y)
    flat = (noise.flatten(0, 1), t.repeat_interleave(8), x0.repeat_interleave(8, 0), y.repeat_interleave(8))
    torch.testing.assert_close(coarse(*flat).reshape(4, 8), got, rtol=1e-12, atol=1e-12)
    assert got.std(dim=1).min() > 0  # the scores tell the candidates apart

    def marginal(rater):  # FLOPs of 4 more candidates per sample
        costs = []
        for k in (4, 8):
            with FlopCounterMode(display=False) as counter:
                rater(noise[:, :k], t, x0, y)
            costs.append(counter.get_total_flops())
        return costs[1] - costs[0]

    assert marginal(coarse) < 0.35 * marginal(shared)
    with pytest.raises(ConfigError, match="noise_patch_size must be a positive divisor of input_size 8, got 3"):
        dual_stream_tiny(noise_patch_size=3)
