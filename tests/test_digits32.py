"""The digits32 task: jittered 32x32 digits (1,024 noise dimensions), DiT-Tiny/8, the 32x32
digit features and the recipe, end to end at a tiny size."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.backbones import dit
from noisevalue.cli import app
from noisevalue.config import check_components, load_recipe
from noisevalue.data.digits import DigitsDataset
from noisevalue.errors import ConfigError
from noisevalue.evaluators.digit_features import (
    DIGITS32,
    DigitFeatureConfig,
    DigitFeatureExtractor,
    digits_split,
)
from noisevalue.evaluators.fid import FIDEvaluator

JITTERED = {"image_size": 32, "jitter": True}


@pytest.fixture(scope="module")
def train32() -> DigitsDataset:
    return DigitsDataset(split="train", **JITTERED)


def numerical_rank(images: torch.Tensor, rel: float = 1e-3) -> int:
    s = torch.linalg.svdvals(images.flatten(1).double())
    return int((s > rel * s[0]).sum())


# --------------------------------------------------------------------------- data
def test_jittered_digits_shape_range_and_split_rule(train32):
    test = DigitsDataset(split="test", **JITTERED)
    plain_train, plain_test = DigitsDataset(split="train"), DigitsDataset(split="test")
    assert train32.images.shape == (1437, 1, 32, 32) and train32.images.dtype == torch.float32
    assert len(test) == 360
    assert train32.images.min().item() == -1.0 and 0.99 < train32.images.max().item() <= 1.0
    # the background stays dark: most pixels of a digit are (near) -1
    assert 0.4 < float((train32.images < -0.95).float().mean()) < 0.8
    # the same split rule as the 8x8 digits: the same items, the same labels
    assert np.array_equal(train32.indices, plain_train.indices) and np.array_equal(test.indices, plain_test.indices)
    assert torch.equal(train32.labels, plain_train.labels)
    assert (train32.channels, train32.num_classes, train32.image_size) == (1, 10, 32)


def test_jittered_digits_are_fixed_and_the_split_seed_moves_only_the_split(train32):
    again = DigitsDataset(split="train", **JITTERED)
    assert torch.equal(again.images, train32.images) and np.array_equal(again.indices, train32.indices)
    other = DigitsDataset(split="train", seed=1, **JITTERED)
    assert not np.array_equal(other.indices, train32.indices)
    # an image is drawn per index of the full set: the same in every split
    everything = DigitsDataset(split="all", **JITTERED)
    assert torch.equal(everything.images[other.indices], other.images)
    assert torch.equal(everything.images[train32.indices], train32.images)
    # and jittered: not the plain bilinear resize
    plain = DigitsDataset(split="train", image_size=32)
    assert (train32.images - plain.images).abs().mean() > 0.05


def test_jittered_digits_span_far_more_than_64_dimensions(train32):
    # a plain resize is linear: the images stay in the 64-dim span of the 8x8 originals
    assert numerical_rank(DigitsDataset(split="train", image_size=32).images[:300]) <= 64
    assert numerical_rank(train32.images[:300]) > 200


def test_jitter_is_in_the_fingerprint_and_checked():
    plain = DigitsDataset(split="test").fingerprint()
    assert "jitter" not in plain  # the 8x8 caches keep their keys
    assert DigitsDataset(split="test", **JITTERED).fingerprint() == {
        "name": "digits", "split": "test", "holdout_fraction": 0.2, "seed": 0, "image_size": 32,
        "jitter": True, "count": 360}
    with pytest.raises(ConfigError, match=r"^params\.jitter: expected true or false; got 'yes'"):
        DigitsDataset(jitter="yes")  # type: ignore[arg-type]


def test_digits_split_renders_as_the_dataset():
    """The feature classifier's images are the dataset's, in train_test_split's order."""
    from sklearn.model_selection import train_test_split

    x, y = digits_split("train", image_size=32, jitter=True)
    assert x.shape == (1437, 1, 32, 32) and x.min() >= 0 and x.max() <= 1
    target = DigitsDataset(split="all").labels.numpy()
    idx, _ = train_test_split(np.arange(1797), test_size=0.2, random_state=0, stratify=target)
    torch.testing.assert_close(x * 2 - 1, DigitsDataset(split="all", **JITTERED).images[idx], atol=1e-6, rtol=0)
    assert torch.equal(y, torch.from_numpy(target[idx]))


# --------------------------------------------------------------------------- backbone and rater
def test_dit_tiny_8_has_dit_tiny_2s_tokens_and_size():
    big, small = dit.DiT_Tiny_8(learn_sigma=False), dit.DiT_Tiny_2(learn_sigma=False)
    assert big.input_size == 32 and big.patch_size == 8 and big.in_channels == 1
    assert big.pos_embed.shape == small.pos_embed.shape == (1, 16, 128)
    count = sum(p.numel() for p in big.parameters())
    d, p = 128, 8
    # DiT-Tiny/2's parameters plus the wider patch embedding and output layer (64 pixels per token)
    assert count == sum(q.numel() for q in small.parameters()) + (p * p - 4) * d + (p * p - 4) * (d + 1)
    assert count == 1_289_792
    x = torch.randn(3, 1, 32, 32)
    out = big(x, torch.tensor([1, 500, 999]), torch.tensor([0, 4, 9]))
    assert out.shape == x.shape
    wide = dit.DiT_Tiny_B_8(learn_sigma=False)
    assert wide.pos_embed.shape == (1, 16, 192)
    assert {"DiT-Tiny/8", "DiT-Tiny-B/8"} <= set(registry.names("backbone"))


def test_tiny_rater_scores_32x32_candidates_at_patch_8():
    torch.manual_seed(0)
    rater = registry.create("rater", "dual_stream_tiny", input_size=32, patch_size=8)
    n, k = 3, 4
    noise = torch.randn(n * k, 1, 32, 32)
    x0 = torch.rand(n, 1, 32, 32).repeat_interleave(k, 0) * 2 - 1
    t = torch.tensor([10, 500, 990]).repeat_interleave(k)
    y = torch.tensor([1, 2, 3]).repeat_interleave(k)
    scores = rater(noise, t, x0, y)
    assert scores.numel() == n * k and torch.isfinite(scores).all()
    assert scores.flatten().unique().numel() == n * k  # every candidate scored on its own noise
    assert rater.pos_embed.shape[1] == 16


# --------------------------------------------------------------------------- features
@pytest.fixture(scope="module")
def digits32_net(tmp_path_factory) -> DigitFeatureExtractor:
    return DigitFeatureExtractor(DIGITS32, cache_dir=tmp_path_factory.mktemp("features32"))


def test_digits32_features_read_32x32_and_classify_held_out_digits(digits32_net):
    # the 8x8 classifier's key is unchanged by the new fields (its caches stay valid)
    assert DigitFeatureConfig().key() == "82fbc5b9dc71c5ce"
    assert DIGITS32.key() != DigitFeatureConfig().key()
    assert digits32_net.trunk[0].in_features == 1024 and digits32_net.num_features == 64
    x, y = digits_split("test", image_size=32, jitter=True)
    assert digits32_net.accuracy > 0.9
    assert float((digits32_net.predict(x) == y).float().mean()) == pytest.approx(digits32_net.accuracy)


def test_fd_digits32_separates_real_digits_from_scrambled_ones(digits32_net):
    ev = FIDEvaluator(features="digits32", cache_dir=digits32_net.cache_dir, batch_size=256, kid=True)
    assert (ev.metric_name, ev.kid_name) == ("fd_digits32", "kid_digits32")
    assert ev.reference_key()["digit_features"] == DIGITS32.key()
    train, _ = digits_split("train", image_size=32, jitter=True)
    test, _ = digits_split("test", image_size=32, jitter=True)
    perm = torch.randperm(1024, generator=torch.Generator().manual_seed(0))
    shuffled = test.flatten(1)[:, perm].view_as(test)
    ev.prepare([train])
    fd_test = ev.evaluate([test])["fd_digits32"]
    assert 0 < fd_test and ev.evaluate([shuffled])["fd_digits32"] > 10 * fd_test


# --------------------------------------------------------------------------- recipe
def test_recipe_loads_and_differs_from_digits_only_in_the_task():
    r, base = load_recipe("digits32"), load_recipe("digits")
    check_components(r)
    assert (r.name, r.output_dir, r.model.name) == ("digits32", "runs/digits32", "DiT-Tiny/8")
    assert r.data.dataset.params == {"split": "train", "holdout_fraction": 0.2, "seed": 0, **JITTERED}
    assert r.data.eval_dataset is not None and r.data.eval_dataset.params["split"] == "test"
    assert r.eval.evaluators[0].params == {"features": "digits32", "kid": True}
    assert r.rater is not None and r.rater.params["patch_size"] == 8
    assert r.select.methods == base.select.methods and r.select.seeds == base.select.seeds
    assert (r.train.steps, r.meta.outer_steps, r.select.steps) == (base.train.steps, base.meta.outer_steps,
                                                                   base.select.steps)


def test_protocol_end_to_end_at_a_tiny_size(tmp_path, tiny_overrides):
    out = tmp_path / "run"
    args = ["run", "digits32", *tiny_overrides, "workflow=protocol",
            "rater.params={hidden_size: 32, depth: 1, num_heads: 2, patch_size: 8}",
            "meta.inner_steps=2", "meta.groups=4", "meta.group_size=3", "meta.val_batch_size=8",
            "meta.log_every=1", "meta.ckpt_every=2", "meta.outer_steps=2", "select.steps=2", "select.eval_every=2",
            "eval.evaluators=[{name: fid, params: {features: digits32}}]", "eval.num_samples=20",
            "eval.baselines=false"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, (result.output, result.exception)
    rows = list(csv.DictReader((out / "comparison.csv").open()))
    assert {r["run"] for r in rows} == {"vanilla", "rater", "random_rater", "oracle", "max_norm", "min_norm"}
    assert list(dict.fromkeys(r["metric"] for r in rows)) == ["heldout_loss", "fd_digits32"]
    assert {int(r["step"]) for r in rows} == {4, 6}
    for metric in ("heldout_loss", "fd_digits32"):
        assert len({r["value"] for r in rows if r["step"] == "4" and r["metric"] == metric}) == 1
    assert (out / "comparison.md").is_file() and (out / "comparison.png").stat().st_size > 0
    from PIL import Image

    grid = sorted((out / "pretrain" / "samples").glob("step_*.png"))[-1]
    width, height = Image.open(grid).size  # 32x32 samples, one row per class (sample.per_class=1)
    assert 32 <= width < 40 and height >= 10 * 32
