"""Datasets, encoders and the latent cache: numbers, not just smoke."""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from noisevalue.data import (
    DigitsDataset,
    IdentityEncoder,
    ImageFolderDataset,
    LatentCacheDataset,
    VAEEncoder,
    adm_center_crop,
    build_latent_cache,
    finalize_latent_cache,
)
from noisevalue.errors import ConfigError, DataError, WeightsUnavailableError

# --------------------------------------------------------------------------- digits


def test_digits_split_sizes_disjoint_and_stratified():
    train = DigitsDataset(split="train", seed=0)
    test = DigitsDataset(split="test", seed=0)
    everything = DigitsDataset(split="all")
    assert len(train) + len(test) == len(everything) == 1797
    assert set(train.indices.tolist()).isdisjoint(test.indices.tolist())
    total = Counter(everything.labels.tolist())
    held = Counter(test.labels.tolist())
    assert len(total) == 10 and set(held) == set(range(10))
    for cls, n in total.items():
        assert abs(held[cls] - 0.2 * n) <= 1, (cls, held[cls], n)
    assert train.images.shape == (len(train), 1, 8, 8) and train.images.dtype == torch.float32
    assert train.labels.dtype == torch.long
    assert (train.num_classes, train.channels, train.image_size) == (10, 1, 8)
    x, y = train[3]
    assert torch.equal(x, train.images[3]) and y == int(train.labels[3])


def test_digits_values_and_determinism():
    a = DigitsDataset(split="all")
    assert a.images.min().item() == -1.0 and a.images.max().item() == 1.0
    # raw value v in 0..16 maps to v / 8 - 1: every value lies on that grid
    assert torch.equal((a.images + 1) * 8, ((a.images + 1) * 8).round())
    same = DigitsDataset(split="test", seed=3)
    again = DigitsDataset(split="test", seed=3)
    other = DigitsDataset(split="test", seed=4)
    assert np.array_equal(same.indices, again.indices)
    assert torch.equal(same.images, again.images)
    assert not np.array_equal(same.indices, other.indices)


def test_digits_resize_and_bad_split():
    big = DigitsDataset(split="all", image_size=16)
    assert big.images.shape == (1797, 1, 16, 16)
    assert big.images.min() >= -1 and big.images.max() <= 1
    small = DigitsDataset(split="all")
    # bilinear 2x upsampling keeps the mean of each image (up to border effects)
    assert torch.allclose(big.images.mean((1, 2, 3)), small.images.mean((1, 2, 3)), atol=0.05)
    with pytest.raises(
        ConfigError, match=r"^params\.split: expected one of train, test, all; got 'x'"
    ):
        DigitsDataset(split="x")


# ------------------------------------------------------------------ ADM centre crop


def test_adm_crop_plain_centre_crop_when_short_side_matches():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(64, 100, 3), dtype=np.uint8)  # H=64, W=100
    out = np.asarray(adm_center_crop(Image.fromarray(arr), 64))
    assert out.shape == (64, 64, 3)
    assert np.array_equal(out, arr[:, 18:82])  # (100 - 64) // 2 == 18


def test_adm_crop_box_halving_then_crop():
    rng = np.random.default_rng(1)
    arr = rng.integers(0, 256, size=(400, 600, 3), dtype=np.uint8)
    out = np.asarray(adm_center_crop(Image.fromarray(arr), 100)).astype(np.float64)
    # 600x400 -> 300x200 -> 150x100 (two BOX halvings), no resize, crop 25 px each side
    ref = arr.astype(np.float64)
    for _ in range(2):
        h, w = ref.shape[0] // 2, ref.shape[1] // 2
        ref = ref[: 2 * h, : 2 * w].reshape(h, 2, w, 2, 3).mean((1, 3))
    ref = ref[:, 25:125]
    assert out.shape == (100, 100, 3)
    # PIL rounds each 8-bit BOX average (within 1 per halving); another filter than BOX,
    # an extra or a missing halving, or a shifted crop would be off by tens on noise
    assert np.abs(out - ref).max() <= 2.0 and np.abs(out - ref).mean() <= 1.0


def test_adm_crop_bicubic_step():
    rng = np.random.default_rng(2)
    img = Image.fromarray(rng.integers(0, 256, size=(250, 300, 3), dtype=np.uint8))
    out = adm_center_crop(img, 128)
    # 250 < 256: no halving; scale 128/250 -> (round(153.6), 128) = (154, 128); left = 13
    ref = img.resize((154, 128), resample=Image.Resampling.BICUBIC).crop((13, 0, 141, 128))
    assert out.size == (128, 128)
    assert np.array_equal(np.asarray(out), np.asarray(ref))


# --------------------------------------------------------------------- image folder


def _write_images(folder: Path, n: int, size: tuple[int, int] = (20, 16), seed: int = 0) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(folder / f"img_{i:02d}.png")


@pytest.fixture
def class_folder(tmp_path: Path) -> Path:
    root = tmp_path / "imgs"
    _write_images(root / "zebra", 3, seed=1)
    _write_images(root / "ant", 2, seed=2)
    (root / "ant" / "readme.txt").write_text("not an image")
    return root


def test_image_folder_classes_and_labels(class_folder: Path):
    ds = ImageFolderDataset(str(class_folder), image_size=16, random_flip=False)
    assert ds.classes == ["ant", "zebra"] and ds.num_classes == 2 and len(ds) == 5
    assert [label for _, label in ds.samples] == [0, 0, 1, 1, 1]
    assert all(p.parent.name == ds.classes[label] for p, label in ds.samples)
    x, y = ds[4]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 1
    assert x.min() >= -1 and x.max() <= 1
    raw = np.array(adm_center_crop(Image.open(ds.paths[4]).convert("RGB"), 16))
    assert torch.allclose(x, torch.from_numpy(raw).permute(2, 0, 1).float() / 127.5 - 1)


def test_image_folder_flip_is_seedable(class_folder: Path):
    ds = ImageFolderDataset(str(class_folder), image_size=16, random_flip=True)
    plain = ds.load_image(0)
    torch.manual_seed(0)
    first = [ds[0][0] for _ in range(16)]
    torch.manual_seed(0)
    second = [ds[0][0] for _ in range(16)]
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    flipped = sum(torch.equal(a, plain.flip(-1)) for a in first)
    assert 0 < flipped < 16
    assert all(torch.equal(a, plain) or torch.equal(a, plain.flip(-1)) for a in first)


def test_image_folder_flat_and_errors(tmp_path: Path, class_folder: Path):
    flat = ImageFolderDataset(str(class_folder), image_size=8, class_conditional=False)
    assert flat.num_classes == 0 and len(flat) == 5 and flat.classes == []
    assert {label for _, label in flat.samples} == {0}

    missing = tmp_path / "nope"
    with pytest.raises(DataError, match=r"^params\.root") as err:
        ImageFolderDataset(str(missing))
    assert f"'{missing}'" in str(err.value) and "does not exist" in str(err.value)

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    for conditional in (True, False):
        with pytest.raises(DataError, match=r"^params\.root: no images \(\.png, \.jpg") as err:
            ImageFolderDataset(str(empty), class_conditional=conditional)
        assert f"'{empty}'" in str(err.value)

    loose = tmp_path / "loose"
    _write_images(loose, 2)
    with pytest.raises(DataError, match="class_conditional=false"):
        ImageFolderDataset(str(loose))


# ----------------------------------------------------------------------------- VAE


def _tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=32,
        layers_per_block=1,
        sample_size=16,
    )


def test_vae_encoder_shapes_mean_and_sampling():
    vae = _tiny_vae()
    enc = VAEEncoder.from_vae(vae, scale_factor=0.5, sample=False)
    assert enc.cacheable and not any(p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.vae.training
    assert enc.latent_shape(3, 16) == (4, 8, 8) and enc.latent_shape(3, 256) == (4, 128, 128)
    with pytest.raises(DataError):
        enc.latent_shape(1, 16)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = enc.encode(x)
    with torch.no_grad():
        expected = vae.encode(x).latent_dist.mean * 0.5
    assert z.shape == (2, 4, 8, 8) and torch.equal(z, expected)
    assert enc.decode(z).shape == (2, 3, 16, 16)

    sampler = VAEEncoder.from_vae(vae, scale_factor=0.5, sample=True)
    a = sampler.encode(x, generator=torch.Generator().manual_seed(1))
    b = sampler.encode(x, generator=torch.Generator().manual_seed(1))
    c = sampler.encode(x, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_vae_offline_error_is_fast_and_helpful(monkeypatch):
    from huggingface_hub import try_to_load_from_cache

    from noisevalue.data import encoders

    if isinstance(try_to_load_from_cache("stabilityai/sd-vae-ft-mse", "config.json"), str):
        pytest.skip("the VAE is in the local Hugging Face cache, so it loads offline")
    monkeypatch.setattr(encoders, "_hub_reachable", lambda timeout=3.0: False)  # be offline
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        VAEEncoder()
    assert time.perf_counter() - start < 10
    message = str(err.value)
    assert "\n" not in message and message.startswith("params.local_path: not set") and "set this key to DIR" in message
    assert "'stabilityai/sd-vae-ft-mse' could not be loaded" in message
    assert "--local-dir DIR" in message and "diffusion_pytorch_model.safetensors" in message


def test_hub_probe_fails_fast(monkeypatch):
    from huggingface_hub import constants

    from noisevalue.data.encoders import _hub_reachable

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    assert _hub_reachable(timeout=2.0) is False
    assert time.perf_counter() - start < 5


def test_vae_missing_local_path(tmp_path: Path):
    with pytest.raises(WeightsUnavailableError, match=r"^params\.local_path"):
        VAEEncoder(local_path=str(tmp_path / "absent"))


def test_vae_from_local_path(tmp_path: Path):
    vae = _tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    loaded = VAEEncoder(local_path=str(tmp_path / "vae"), sample=False)
    direct = VAEEncoder.from_vae(vae, sample=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    assert torch.equal(loaded.encode(x), direct.encode(x))
    assert loaded.fingerprint()["weights_sha256"] == direct.fingerprint()["weights_sha256"]
    assert (
        loaded.fingerprint()["weights_sha256"]
        != VAEEncoder.from_vae(_tiny_vae(1)).fingerprint()["weights_sha256"]
    )


def test_identity_encoder():
    enc = IdentityEncoder()
    x = torch.randn(2, 1, 8, 8)
    assert not enc.cacheable and enc.latent_shape(1, 8) == (1, 8, 8)
    assert torch.equal(enc.decode(enc.encode(x)), x)


# -------------------------------------------------------------------- latent cache


@pytest.fixture(scope="module")
def tiny_vae():
    return _tiny_vae()


@pytest.fixture
def cache_data(tmp_path: Path):
    root = tmp_path / "imgs"
    _write_images(root / "a", 4, size=(24, 18), seed=3)
    _write_images(root / "b", 3, size=(18, 24), seed=4)
    return ImageFolderDataset(str(root), image_size=16, random_flip=True)


def _direct(ds, enc, chunks, flip=False):
    """Encode ``ds`` unflipped in the same batches as the cache (CPU convolutions may round
    differently for other batch sizes)."""
    x = torch.stack([ds.load_image(i) for i in range(len(ds))])
    x = x.flip(-1) if flip else x
    z = torch.cat([enc.encode(x[a:b]) for a, b in zip(chunks[:-1], chunks[1:], strict=True)])
    return z, torch.tensor([label for _, label in ds.samples])


def test_latent_cache_roundtrip_and_reuse(tmp_path, cache_data, tiny_vae, monkeypatch):
    enc = VAEEncoder.from_vae(tiny_vae, sample=False)
    out = build_latent_cache(
        cache_data,
        enc,
        tmp_path / "c",
        batch_size=2,
        shard_size=3,
        include_flips=True,
        fingerprint={"recipe": "x"},
    )
    assert sorted(p.name for p in out.glob("shard_*")) == [
        f"shard_0000{i}.safetensors" for i in range(3)
    ]
    assert cache_data.random_flip  # restored after encoding unflipped images
    cache = LatentCacheDataset(out)
    assert len(cache) == 7 and cache.num_classes == 2 and cache.latent_shape == (4, 8, 8)
    assert (cache.channels, cache.image_size) == (4, 8)
    chunks = [0, 2, 3, 5, 6, 7]  # shards of 3 items, batches of 2 within each shard
    z, y = _direct(cache_data, enc, chunks)
    zf, _ = _direct(cache_data, enc, chunks, flip=True)
    xs, ys = cache.get_batch(torch.arange(7))
    assert torch.equal(xs, z) and torch.equal(ys, y)
    mask = torch.tensor([True, False, True, False, False, True, True])
    order = torch.tensor([6, 0, 3, 5, 1, 4, 2])
    xm, ym = cache.get_batch(order, flip_mask=mask)
    assert torch.equal(xm, torch.where(mask[:, None, None, None], zf[order], z[order]))
    assert torch.equal(ym, y[order])
    assert torch.equal(cache[5][0], z[5]) and cache[5][1] == int(y[5])

    def boom(*args, **kwargs):
        raise AssertionError("re-encoded")

    monkeypatch.setattr(enc, "encode", boom)
    assert (
        build_latent_cache(
            cache_data,
            enc,
            out,
            batch_size=4,
            shard_size=5,
            include_flips=True,
            fingerprint={"recipe": "x"},
        )
        == out
    )
    with pytest.raises(DataError, match="differs in: fingerprint.*delete"):
        build_latent_cache(cache_data, enc, out, include_flips=True, fingerprint={"recipe": "y"})


def test_latent_cache_two_ranks_equal_single(tmp_path, cache_data, tiny_vae):
    enc = VAEEncoder.from_vae(tiny_vae, sample=True)  # sampled per shard with its own seed
    single = LatentCacheDataset(build_latent_cache(cache_data, enc, tmp_path / "one", shard_size=2))
    multi = tmp_path / "two"
    (multi).mkdir()
    (multi / "shard_00001.safetensors.tmp.999.deadbeef").write_bytes(b"half a shard")
    build_latent_cache(cache_data, enc, multi, shard_size=2, rank=0, world_size=2)
    with pytest.raises(DataError, match="not complete"):
        LatentCacheDataset(multi)
    with pytest.raises(DataError, match=r"incomplete: 2 shard\(s\).*shard_00001"):
        finalize_latent_cache(multi)
    build_latent_cache(cache_data, enc, multi, shard_size=2, rank=1, world_size=2)
    finalize_latent_cache(multi)
    assert not list(multi.glob("*.tmp.*"))
    both = LatentCacheDataset(multi)
    a, b = single.get_batch(range(7)), both.get_batch(range(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_latent_cache_damaged_shard(tmp_path, cache_data, tiny_vae, monkeypatch):
    enc = VAEEncoder.from_vae(tiny_vae, sample=False)
    out = build_latent_cache(
        cache_data, IdentityEncoder(), tmp_path / "pix", shard_size=3, dtype="float16"
    )
    pix = LatentCacheDataset(out)
    assert pix.latent_shape == (3, 16, 16) and pix.content["dtype"] == "float16"
    exact = torch.stack([cache_data.load_image(i) for i in range(7)]).half().float()
    assert torch.equal(pix.get_batch(range(7))[0], exact)

    out = build_latent_cache(cache_data, enc, tmp_path / "c", shard_size=3)
    reference = LatentCacheDataset(out).get_batch(range(7))
    shard = out / "shard_00001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DataError, match="shard_00001.*damaged"):
        LatentCacheDataset(out)
    (out / "index.json").unlink()  # the documented way to repair: build again
    calls = []
    real = enc.encode
    monkeypatch.setattr(enc, "encode", lambda x, **kw: calls.append(len(x)) or real(x, **kw))
    with pytest.warns(UserWarning, match="damaged"):
        build_latent_cache(cache_data, enc, out, shard_size=3)
    assert sum(calls) == 3  # only the damaged shard was encoded again
    again = LatentCacheDataset(out).get_batch(range(7))
    assert torch.equal(again[0], reference[0]) and torch.equal(again[1], reference[1])
