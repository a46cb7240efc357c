"""DiT backbone: reference layout and sizes, init, guidance, purity, registry."""

from __future__ import annotations

import inspect
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.nn.attention import SDPBackend, sdpa_kernel

from noisevalue import registry
from noisevalue.backbones import dit
from noisevalue.errors import ConfigError
from noisevalue.interfaces import Backbone

# name -> (depth, hidden, heads, patch), as in the DiT paper (Table 1).
ARCHS = {
    f"DiT-{size}/{patch}": (depth, hidden, heads, patch)
    for size, (depth, hidden, heads) in {
        "S": (12, 384, 6),
        "B": (12, 768, 12),
        "L": (24, 1024, 16),
        "XL": (28, 1152, 16),
    }.items()
    for patch in (2, 4, 8)
}
# Published sizes (millions, including the frozen pos_embed) and their precision.
PUBLISHED = {
    "DiT-S/2": (32.96, 0.005),
    "DiT-B/2": (130.5, 0.05),
    "DiT-L/2": (458.1, 0.05),
    "DiT-XL/2": (675.13, 0.005),
}
ALL_NAMES = [*ARCHS, "DiT-Tiny/2", "DiT-Tiny-B/2", "DiT-Tiny/8", "DiT-Tiny-B/8"]


def factory(name: str):
    return getattr(dit, name.replace("-", "_").replace("/", "_"))


def closed_form_count(depth, d, p, size=32, c=4, classes=1000, learn_sigma=True, freq=256):
    """Parameter count from the architecture, block by block."""
    out = 2 * c if learn_sigma else c
    attn = (d * 3 * d + 3 * d) + (d * d + d)  # qkv, proj
    mlp = (d * 4 * d + 4 * d) + (4 * d * d + d)  # fc1, fc2
    ada = d * 6 * d + 6 * d
    block = attn + mlp + ada
    t_embed = (freq * d + d) + (d * d + d)
    y_embed = (classes + 1) * d  # + the null class
    x_embed = c * p * p * d + d
    pos = (size // p) ** 2 * d
    final = (d * 2 * d + 2 * d) + (d * p * p * out + p * p * out)
    return depth * block + t_embed + y_embed + x_embed + pos + final


def official_shapes(depth, d, p, size=32, c=4, classes=1000, learn_sigma=True):
    """State-dict keys and shapes of the reference implementation's layout."""
    out = 2 * c if learn_sigma else c
    shapes = {
        "pos_embed": (1, (size // p) ** 2, d),
        "x_embedder.proj.weight": (d, c, p, p),
        "x_embedder.proj.bias": (d,),
        "t_embedder.mlp.0.weight": (d, 256),
        "t_embedder.mlp.0.bias": (d,),
        "t_embedder.mlp.2.weight": (d, d),
        "t_embedder.mlp.2.bias": (d,),
        "y_embedder.embedding_table.weight": (classes + 1, d),
        "final_layer.linear.weight": (p * p * out, d),
        "final_layer.linear.bias": (p * p * out,),
        "final_layer.adaLN_modulation.1.weight": (2 * d, d),
        "final_layer.adaLN_modulation.1.bias": (2 * d,),
    }
    for i in range(depth):
        for name, (rows, cols) in {
            "attn.qkv": (3 * d, d),
            "attn.proj": (d, d),
            "mlp.fc1": (4 * d, d),
            "mlp.fc2": (d, 4 * d),
            "adaLN_modulation.1": (6 * d, d),
        }.items():
            shapes[f"blocks.{i}.{name}.weight"] = (rows, cols)
            shapes[f"blocks.{i}.{name}.bias"] = (rows,)
    return shapes


def perturbed_tiny(**kwargs) -> dit.DiT:
    """A tiny model whose zero-initialised layers are randomised, so labels matter."""
    torch.manual_seed(0)
    model = dit.DiT_Tiny_2(**kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN" in name or "final_layer" in name:
                p.normal_(0, 0.05)
    return model


def inputs(n=4, c=1, size=8, classes=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size, size, generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return x, t, y


@pytest.mark.parametrize("name", list(ARCHS))
def test_parameter_counts_and_layout(name):
    depth, hidden, _, patch = ARCHS[name]
    with torch.device("meta"):
        model = factory(name)(input_size=32, in_channels=4, num_classes=1000, learn_sigma=True)
    assert isinstance(model, Backbone) and model.config_name == name
    count = sum(p.numel() for p in model.parameters())
    assert count == closed_form_count(depth, hidden, patch)
    if name in PUBLISHED:
        figure, tolerance = PUBLISHED[name]
        assert abs(count / 1e6 - figure) <= tolerance
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_shapes(depth, hidden, patch)
    assert not model.pos_embed.requires_grad


def test_spot_check_s2_keys():
    with torch.device("meta"):
        sd = dit.DiT_S_2().state_dict()
    assert sd["x_embedder.proj.weight"].shape == (384, 4, 2, 2)
    assert sd["y_embedder.embedding_table.weight"].shape == (1001, 384)
    assert sd["blocks.0.adaLN_modulation.1.weight"].shape == (2304, 384)
    assert sd["final_layer.linear.weight"].shape == (32, 384)
    assert sd["pos_embed"].shape == (1, 256, 384)
    assert "blocks.11.attn.qkv.weight" in sd and "blocks.12.attn.qkv.weight" not in sd


def test_no_null_row_without_label_dropout():
    with torch.device("meta"):
        model = dit.DiT_S_2(class_dropout_prob=0.0)
    assert model.y_embedder.embedding_table.weight.shape == (1000, 384)
    assert not model.has_null_label


def test_safetensors_round_trip(tmp_path):
    model = perturbed_tiny()
    path = tmp_path / "dit.safetensors"
    save_file(model.state_dict(), str(path))
    torch.manual_seed(123)
    fresh = dit.DiT_Tiny_2()
    fresh.load_state_dict(load_file(str(path)), strict=True)
    for (k, a), (k2, b) in zip(model.state_dict().items(), fresh.state_dict().items(), strict=True):
        assert k == k2 and a.dtype == b.dtype and torch.equal(a, b)
    x, t, y = inputs()
    assert torch.equal(model(x, t, y), fresh(x, t, y))


def test_pos_embed_is_2d_sincos():
    model = dit.DiT(
        input_size=12,
        patch_size=3,
        in_channels=1,
        hidden_size=16,
        depth=1,
        num_heads=2,
        num_classes=0,
    )
    grid, d = 4, 16
    expected = np.zeros((grid * grid, d))
    quarter = d // 4
    for i in range(grid):  # row
        for j in range(grid):  # column
            for m in range(quarter):
                w = 10000.0 ** (-m / quarter)
                # first half encodes the column, second half the row (reference layout)
                expected[i * grid + j, m] = math.sin(j * w)
                expected[i * grid + j, quarter + m] = math.cos(j * w)
                expected[i * grid + j, 2 * quarter + m] = math.sin(i * w)
                expected[i * grid + j, 3 * quarter + m] = math.cos(i * w)
    got = model.pos_embed.detach()
    assert got.shape == (1, grid * grid, d) and got.dtype == torch.float32
    np.testing.assert_allclose(got[0].double().numpy(), expected, rtol=0, atol=1e-7)
    assert "pos_embed" not in {n for n, p in model.named_parameters() if p.requires_grad}


def test_adaln_zero_init_gives_zero_output():
    model = dit.DiT_Tiny_2()
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or "final_layer.linear" in name:
            assert torch.count_nonzero(p) == 0, name
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (4, 2, 8, 8) and torch.count_nonzero(out) == 0


@pytest.mark.parametrize("learn_sigma", [True, False])
def test_cfg_guides_all_eps_channels(learn_sigma):
    model = perturbed_tiny(in_channels=4, learn_sigma=learn_sigma).eval()
    x, t, y = inputs(n=3, c=4)
    null = torch.full_like(y, model.num_classes)
    with torch.no_grad():
        cond, uncond = model(x, t, y), model(x, t, null)
        assert not torch.allclose(cond, uncond)  # labels matter after perturbation
        x2, t2, y2 = torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null])
        out1 = model.forward_with_cfg(x2, t2, y2, 1.0)
        scale = 4.0
        out = model.forward_with_cfg(x2, t2, y2, scale)
    assert out.shape == (6, model.out_channels, 8, 8)
    assert torch.equal(out[:3], out[3:])
    torch.testing.assert_close(out1[:3], cond, rtol=0, atol=1e-5)
    torch.testing.assert_close(
        out[:3, :4], uncond[:, :4] + scale * (cond[:, :4] - uncond[:, :4]), rtol=0, atol=1e-4
    )
    if learn_sigma:
        torch.testing.assert_close(out[:3, 4:], cond[:, 4:], rtol=0, atol=1e-5)


def test_forward_is_pure_in_train_mode():
    model = perturbed_tiny().train()
    x, t, y = inputs()
    x0, y0 = x.clone(), y.clone()
    torch.manual_seed(0)
    a = model(x, t, y)
    torch.manual_seed(1)
    b = model(x, t, y)
    assert torch.equal(a, b) and torch.equal(x, x0) and torch.equal(y, y0)
    null = torch.full_like(y, 10)
    assert not torch.equal(model(x, t, null), a)  # the null label is a real table row


def test_functional_call_and_double_backward():
    model = perturbed_tiny()
    x, t, y = inputs()
    params = {
        k: v.detach().clone().requires_grad_(v.requires_grad) for k, v in model.named_parameters()
    }
    trainable = [v for v in params.values() if v.requires_grad]
    with sdpa_kernel(SDPBackend.MATH):
        out = torch.func.functional_call(model, params, (x, t, y))
        torch.testing.assert_close(out, model(x, t, y), rtol=0, atol=0)
        grads = torch.autograd.grad(out.square().mean(), trainable, create_graph=True)
        penalty = sum(g.square().sum() for g in grads)
        second = torch.autograd.grad(penalty, trainable)
    assert all(torch.isfinite(g).all() for g in second)
    assert any(g.abs().sum() > 0 for g in second)


def test_unconditional_model():
    model = dit.DiT_Tiny_2(num_classes=0)
    assert model.y_embedder is None and model.num_classes == 0
    assert not any(n.startswith("y_embedder") for n in model.state_dict())
    x, t, _ = inputs()
    assert model(x, t, None).shape == (4, 2, 8, 8)
    with pytest.raises(ValueError, match="guidance"):
        model.forward_with_cfg(torch.cat([x, x]), torch.cat([t, t]), None, 2.0)


def test_bad_config_and_inputs():
    with pytest.raises(
        ConfigError, match="input_size 9 is not divisible by patch size 2 of DiT-S/2"
    ):
        dit.DiT_S_2(input_size=9)
    with pytest.raises(ConfigError, match="DiT-XL/8"):
        registry.create("backbone", "DiT-XL/8", input_size=36)
    with pytest.raises(ConfigError, match="unknown parameter 'depth'"):
        registry.create("backbone", "DiT-S/2", depth=3)
    model = dit.DiT_Tiny_2()
    x, t, y = inputs()
    with pytest.raises(ValueError, match=r"expects input \[N, 1, 8, 8\], got \[4, 3, 8, 8\]"):
        model(x.repeat(1, 3, 1, 1), t, y)
    with pytest.raises(ValueError, match="got"):
        model(torch.randn(4, 1, 16, 16), t, y)
    with pytest.raises(ValueError, match="needs labels"):
        model(x, t, None)


def test_registry_builds_every_config():
    assert set(ALL_NAMES) <= set(registry.names("backbone"))
    with torch.device("meta"):
        model = registry.create(
            "backbone", "DiT-S/2", input_size=32, in_channels=4, num_classes=1000
        )
    assert isinstance(model, dit.DiT) and model.config_name == "DiT-S/2"
    expected = [
        "input_size",
        "in_channels",
        "num_classes",
        "class_dropout_prob",
        "learn_sigma",
        "mlp_ratio",
        "time_freq_shift",
        "mlp_norm_eps",
    ]
    for name in ALL_NAMES:
        assert list(inspect.signature(registry.get("backbone", name)).parameters) == expected


@pytest.mark.parametrize("learn_sigma, channels", [(True, 2), (False, 1)])
def test_tiny_shapes(learn_sigma, channels):
    model = dit.DiT_Tiny_2(input_size=8, in_channels=1, num_classes=10, learn_sigma=learn_sigma)
    assert model.out_channels == channels
    x, t, y = inputs(n=5)
    out = model(x, t, y)
    assert out.shape == (5, channels, 8, 8)
    out.sum().backward()  # gradients flow despite the zero init
    assert model.final_layer.linear.weight.grad is not None
