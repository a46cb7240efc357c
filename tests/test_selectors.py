"""Noise selectors: random, the norm baselines, a frozen rater."""

from __future__ import annotations

import json

import pytest
import torch

from noisevalue import checkpoint, registry
from noisevalue.errors import CheckpointError, ConfigError
from noisevalue.interfaces import NoiseSelector
from noisevalue.raters import NormRater, dual_stream_tiny
from noisevalue.selectors import (
    MaxNormSelector,
    MinNormSelector,
    RandomSelector,
    RaterSelector,
)

TINY_PARAMS = {"depth": 1, "hidden_size": 32, "num_heads": 2}


@pytest.fixture
def tiny_registered():
    registry.register("rater", "dual_stream_tiny")(dual_stream_tiny)
    registry.register("rater", "norm")(NormRater)
    yield
    registry.reset()


def batch(n=5, k=4, shape=(1, 8, 8), seed=0, classes=10):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(n, *shape, generator=g)
    y = torch.randint(0, classes + 1, (n,), generator=g)
    t = torch.randint(0, 1000, (n,), generator=g)
    cands = torch.randn(n, k, *shape, generator=g)
    return x0, y, t, cands


def tiny_rater(seed=0, **kw):
    torch.manual_seed(seed)
    return dual_stream_tiny(**{**TINY_PARAMS, **kw})


def test_norm_selectors_pick_extreme_norms():
    x0, y, t, cands = batch(n=64, k=4, shape=(4, 8, 8))
    norms = torch.stack([torch.stack([c.norm() for c in group]) for group in cands])
    assert torch.equal(MaxNormSelector(k=4).select(x0, y, t, cands), norms.argmax(1))
    assert torch.equal(MinNormSelector(k=4).select(x0, y, t, cands), norms.argmin(1))
    # Not trivially constant: different groups pick different indices.
    assert MaxNormSelector(k=4).select(x0, y, t, cands).unique().numel() == 4


def test_random_selector_is_vanilla():
    x0, y, t, cands = batch(k=1)
    chosen = RandomSelector().select(x0, y, t, cands)
    assert RandomSelector().k == 1
    assert chosen.dtype == torch.long and torch.equal(chosen, torch.zeros(5, dtype=torch.long))
    x0, y, t, cands = batch(k=3)
    assert torch.equal(RandomSelector(k=3).select(x0, None, t, cands), torch.zeros(5).long())


def test_selectors_validate():
    for cls in (RandomSelector, MaxNormSelector, MinNormSelector):
        with pytest.raises(ConfigError, match="k must be"):
            cls(k=0)
    x0, y, t, cands = batch(k=3)
    with pytest.raises(ValueError, match="k=4"):
        MaxNormSelector(k=4).select(x0, y, t, cands)


def test_rater_selector_picks_the_argmax_score():
    rater = tiny_rater()
    selector = RaterSelector(k=4, rater=rater)
    assert isinstance(selector, NoiseSelector) and selector.k == 4
    x0, y, t, cands = batch(n=16, k=4)
    before = cands.clone()
    chosen = selector.select(x0, y, t, cands)
    assert torch.equal(cands, before)  # inputs untouched
    with torch.no_grad():
        by_hand = torch.stack(
            [
                torch.stack(
                    [rater(c[None], t[i : i + 1], x0[i : i + 1], y[i : i + 1])[0] for c in g]
                )
                for i, g in enumerate(cands)
            ]
        )
    scores = selector.scores(x0, y, t, cands)
    assert not scores.requires_grad
    torch.testing.assert_close(scores, by_hand, rtol=0, atol=1e-5)
    assert torch.equal(chosen, by_hand.argmax(1))
    assert chosen.unique().numel() > 1  # the choice depends on the candidates
    # Chunked scoring gives the same scores; k=1 needs no rater call.
    chunked = RaterSelector(k=4, rater=rater, batch_size=3).scores(x0, y, t, cands)
    torch.testing.assert_close(chunked, scores, rtol=0, atol=1e-6)
    assert torch.equal(
        RaterSelector(k=1, rater=rater).select(x0, y, t, cands[:, :1]), torch.zeros(16).long()
    )
    # The in-memory rater is used as given, not frozen.
    assert all(p.requires_grad for p in rater.parameters())


def test_rater_selector_with_norm_rater_matches_max_and_min_norm():
    x0, y, t, cands = batch(n=32, k=4)
    for sign, baseline in ((1, MaxNormSelector(k=4)), (-1, MinNormSelector(k=4))):
        sel = RaterSelector(k=4, rater=NormRater(sign=sign))
        assert torch.equal(sel.select(x0, y, t, cands), baseline.select(x0, y, t, cands))
        sel.check_compatible((4, 32, 32), 1000)  # fits anything


def save_tiny(tmp_path, rater, params, step=7):
    meta = checkpoint.CheckpointMeta(step=step, rater={"name": "dual_stream_tiny", "params": params})
    return checkpoint.save_checkpoint(tmp_path, {"rater": rater.state_dict()}, meta)


def test_rater_selector_from_checkpoint(tmp_path, tiny_registered):
    params = {**TINY_PARAMS, "use_timestep": True}
    rater = tiny_rater(seed=3, **params)
    ckpt = save_tiny(tmp_path / "ckpts", rater, params)
    x0, y, t, cands = batch(n=8, k=4)
    expected = RaterSelector(k=4, rater=rater).scores(x0, y, t, cands)
    for where in (ckpt, tmp_path / "ckpts", str(ckpt)):  # the folder or its parent
        selector = RaterSelector(k=4, checkpoint=where)
        assert torch.equal(selector.scores(x0, y, t, cands), expected)
        assert not any(p.requires_grad for p in selector.rater.parameters())
        assert selector.rater.config == rater.config
    selector.check_compatible((1, 8, 8), 10)
    assert selector.to("cpu") is selector


def test_rater_checkpoint_incompatible(tmp_path, tiny_registered):
    rater = tiny_rater()
    ckpt = save_tiny(tmp_path, rater, TINY_PARAMS)
    selector = RaterSelector(k=2, checkpoint=ckpt)
    with pytest.raises(CheckpointError) as info:
        selector.check_compatible((4, 32, 32), 1000)
    message = str(info.value)
    assert "trained for latents (1, 8, 8) and 10 classes" in message
    assert "backbone uses (4, 32, 32) and 1000 classes" in message
    assert str(ckpt) in message
    with pytest.raises(CheckpointError, match="10 classes, but the backbone uses"):
        selector.check_compatible((1, 8, 8), 0)
    # A rater that ignores labels fits any class count.
    label_free = RaterSelector(k=2, rater=tiny_rater(use_label=False))
    label_free.check_compatible((1, 8, 8), 0)
    with pytest.raises(CheckpointError, match="latents"):
        label_free.check_compatible((1, 16, 16), 10)


def test_rater_selector_config_errors(tmp_path, tiny_registered):
    with pytest.raises(
        ConfigError, match=r"needs params\.checkpoint \(a rater checkpoint folder\)"
    ):
        RaterSelector(k=4)
    with pytest.raises(ConfigError, match="not both"):
        RaterSelector(k=4, checkpoint=tmp_path, rater=NormRater())
    with pytest.raises(ConfigError, match="batch_size"):
        RaterSelector(k=4, rater=NormRater(), batch_size=0)
    with pytest.raises(CheckpointError, match="no checkpoint found"):
        RaterSelector(k=4, checkpoint=tmp_path / "missing")
    # A checkpoint that is not a rater's.
    other = checkpoint.save_checkpoint(tmp_path / "model", {"model": {}},
                                      checkpoint.CheckpointMeta(step=1, backbone={"name": "x"}))
    with pytest.raises(CheckpointError, match="not a rater checkpoint"):
        RaterSelector(k=4, checkpoint=other)
    # Weights that do not fit the recorded architecture.
    ckpt = save_tiny(tmp_path / "bad", tiny_rater(hidden_size=64, num_heads=4), TINY_PARAMS)
    with pytest.raises(CheckpointError, match="shape"):
        RaterSelector(k=4, checkpoint=ckpt)
    (ckpt / "rater.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        RaterSelector(k=4, checkpoint=ckpt)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["rater"]["name"] == "dual_stream_tiny"


def test_rater_selector_scores_in_bf16_and_through_a_compiled_rater(monkeypatch):
    rater = tiny_rater(seed=2)
    with torch.no_grad():
        for p in rater.parameters():
            p.add_(0.05 * torch.randn_like(p))  # leave the zero-initialised head
    x0, y, t, cands = batch(n=16, k=4)
    full = RaterSelector(k=4, rater=rater, precision="fp32").scores(x0, y, t, cands)
    half = RaterSelector(k=4, rater=rater, precision="bf16").scores(x0, y, t, cands)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert torch.allclose(half, full, atol=0.05 * full.abs().max().item())
    # ranked in float32: the head runs outside autocast, so scores are not bf16-rounded
    assert not torch.equal(half, half.bfloat16().float())
    assert torch.equal(RaterSelector(k=4, rater=rater).scores(x0, y, t, cands), full)  # auto on CPU: fp32

    compiled = []

    def fake_compile(module, **options):
        compiled.append(options)
        return lambda *args: module(*args)

    monkeypatch.setattr(torch, "compile", fake_compile)
    sel = RaterSelector(k=4, rater=rater, compile=True, batch_size=24)
    for _ in range(2):
        assert torch.equal(sel.scores(x0, y, t, cands), full)
    assert compiled == [{"mode": "default", "dynamic": False}]  # built once; CUDA graphs on CUDA only
    RaterSelector(k=4, rater=rater).scores(x0, y, t, cands)  # auto: not compiled on the CPU
    assert len(compiled) == 1
    with pytest.raises(ConfigError, match="precision must be auto, fp32 or bf16, got 'fp16'"):
        RaterSelector(k=4, rater=rater, precision="fp16")


def test_a_compiled_raters_reused_output_buffer_is_copied(monkeypatch):
    """A CUDA graph writes each replay's output into the same buffer: the scores of earlier
    chunks must be copies, or the last chunk's values overwrite them."""
    rater = NormRater()
    x0, y, t, cands = batch(n=6, k=4)
    eager = RaterSelector(k=4, rater=rater).scores(x0, y, t, cands)

    def graph_like(module, **options):
        buffer = torch.empty(0)

        def replay(*args):
            nonlocal buffer
            out = module(*args).float()
            if buffer.shape != out.shape:
                buffer = torch.empty_like(out)
            return buffer.copy_(out)  # always the same tensor, as a graph's static output

        return replay

    monkeypatch.setattr(torch, "compile", graph_like)
    chunked = RaterSelector(k=4, rater=rater, compile=True, batch_size=4).scores(x0, y, t, cands)
    assert torch.equal(chunked, eager)
