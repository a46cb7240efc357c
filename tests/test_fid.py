"""Fréchet distance, the FID evaluator and the download-free digit feature space."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy import linalg
from torch import nn

from noisevalue.errors import ConfigError, WeightsUnavailableError
from noisevalue.evaluators.digit_features import (
    CACHE_ENV,
    DigitFeatureConfig,
    DigitFeatureExtractor,
    default_cache_dir,
    digits_split,
)
from noisevalue.evaluators.fid import FIDEvaluator, feature_statistics, frechet_distance


def _random_stats(rng: np.random.Generator, n: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    mix = rng.standard_normal((d, d)) / np.sqrt(d)
    return feature_statistics(rng.standard_normal((n, d)) @ mix + rng.standard_normal(d))


def _fd_scipy(mu1, s1, mu2, s2) -> float:
    """The pytorch-fid / ADM reference formula (scipy sqrtm of S1 S2)."""
    covmean = linalg.sqrtm(s1 @ s2).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


class Projection(nn.Module):
    """A fixed random linear map of the pixels: features whose statistics we know exactly."""

    def __init__(self, in_dim: int = 64, num_features: int = 16, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.register_buffer("weight", torch.randn(in_dim, num_features, generator=gen))
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).double() @ self.weight.double()


def _images(n: int = 200, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


# -- frechet_distance -------------------------------------------------------------------
@pytest.mark.parametrize("n", [500, 20])  # full-rank, and singular (fewer samples than dims)
def test_frechet_distance_of_a_set_with_itself_is_zero(n: int) -> None:
    mu, sigma = _random_stats(np.random.default_rng(0), n, 64)
    assert np.trace(sigma) > 1.0
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    rng = np.random.default_rng(1)
    mu1, mu2 = rng.standard_normal(32), rng.standard_normal(32)
    a, b = rng.uniform(0.1, 3.0, 32), rng.uniform(0.1, 3.0, 32)
    expected = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    got = frechet_distance(mu1, np.diag(a), mu2, np.diag(b))
    assert got == pytest.approx(expected, rel=1e-6)
    # torch inputs are accepted and give the same float64 number
    t = [torch.from_numpy(v) for v in (mu1, np.diag(a), mu2, np.diag(b))]
    assert frechet_distance(*t) == pytest.approx(expected, rel=1e-12)


def test_frechet_distance_agrees_with_scipy_and_torchmetrics_formulas() -> None:
    from torchmetrics.image.fid import _compute_fid

    rng = np.random.default_rng(2)
    (mu1, s1), (mu2, s2) = _random_stats(rng, 400, 48), _random_stats(rng, 300, 48)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours > 1.0
    assert ours == pytest.approx(_fd_scipy(mu1, s1, mu2, s2), rel=1e-8)
    tm = _compute_fid(*(torch.from_numpy(v) for v in (mu1, s1, mu2, s2)))
    assert ours == pytest.approx(float(tm), rel=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-10)
    with pytest.raises(ValueError):
        frechet_distance(mu1, s1, mu2[:10], s2)


def test_frechet_distance_on_ill_conditioned_covariances_against_scipy_sqrtm() -> None:
    """Covariances of condition number 1e13 (eigenvalues 1e-10 to 1e3): with shared
    eigenvectors the distance has a closed form, which ours meets to 1e-10 and scipy's float64
    ``sqrtm`` of ``S1 S2`` to 1e-8; with different eigenvectors ours agrees with scipy's to 1e-7."""
    rng = np.random.default_rng(4)
    d = 64
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a, b = np.logspace(-10, 3, d), rng.permutation(np.logspace(-9, 2, d))
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T
    assert np.linalg.cond(s1) > 1e12
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    exact = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-10)
    assert _fd_scipy(mu1, s1, mu2, s2) == pytest.approx(exact, rel=1e-8)
    other, _ = np.linalg.qr(rng.standard_normal((d, d)))
    s3 = (other * b) @ other.T
    assert frechet_distance(mu1, s1, mu2, s3) == pytest.approx(_fd_scipy(mu1, s1, mu2, s3), rel=1e-7)


def test_feature_statistics_is_mean_and_unbiased_covariance() -> None:
    f = np.random.default_rng(3).standard_normal((50, 5))
    mu, sigma = feature_statistics(torch.from_numpy(f))
    np.testing.assert_allclose(mu, f.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(f, rowvar=False), rtol=1e-12)


# -- FIDEvaluator with a custom feature module ------------------------------------------
def test_evaluator_full_path_with_custom_features(tmp_path) -> None:
    proj = Projection()
    ev = FIDEvaluator(feature_extractor=proj, batch_size=7)
    assert ev.metric_name == "fd_custom"
    x = _images()
    ev.prepare([x[:90], x[90:]])
    mu, sigma = feature_statistics(proj(x))
    np.testing.assert_allclose(ev.reference_statistics[0], mu, rtol=1e-10)
    np.testing.assert_allclose(ev.reference_statistics[1], sigma, rtol=1e-8, atol=1e-10)

    same = ev.evaluate([x])["fd_custom"]
    assert abs(same) < 1e-6 * np.trace(sigma)

    shifted = x + 0.1  # a constant pixel shift moves the mean only: FD = ||0.1 * W^T 1||^2
    fd = ev.evaluate([shifted[:33], shifted[33:]])["fd_custom"]
    closed = float((0.1 * proj.weight.double().sum(0)).square().sum())
    assert fd == pytest.approx(closed, rel=1e-4)
    assert fd == pytest.approx(_fd_scipy(*feature_statistics(proj(shifted)), mu, sigma), rel=1e-4)
    # torchmetrics' own compute() sees the same accumulated state
    assert float(ev.metric.compute()) == pytest.approx(fd, rel=1e-6)
    assert ev.evaluate([shifted])["fd_custom"] == pytest.approx(fd, rel=1e-12)  # repeatable

    other = _images(150, seed=1)
    fd_other = ev.evaluate([other])["fd_custom"]
    stats = tmp_path / "ref" / "stats.npz"
    ev.save_reference_stats(stats)
    assert sorted(np.load(stats).files) == ["mu", "n", "sigma"]
    loaded = FIDEvaluator(feature_extractor=proj, reference_stats=stats, metric_name="fd_proj")
    loaded.prepare([])  # statistics come from the file; the images are not read
    assert loaded.evaluate([other]) == {"fd_proj": pytest.approx(fd_other, rel=1e-9)}
    assert float(loaded.metric.compute()) == pytest.approx(fd_other, rel=1e-6)

    np.savez(tmp_path / "adm.npz", mu=mu.astype(np.float32), sigma=sigma)  # ADM-style: no n
    adm = FIDEvaluator(feature_extractor=proj, reference_stats=tmp_path / "adm.npz")
    adm.prepare([])
    assert adm.evaluate([other])["fd_custom"] == pytest.approx(fd_other, rel=1e-5)
    adm.save_reference_stats(tmp_path / "copy.npz")
    assert sorted(np.load(tmp_path / "copy.npz").files) == ["mu", "sigma"]
    np.savez(tmp_path / "small.npz", mu=mu[:4], sigma=sigma[:4, :4])
    with pytest.raises(ConfigError, match="dimension 16"):
        FIDEvaluator(feature_extractor=proj, reference_stats=tmp_path / "small.npz").prepare([])


def test_kid_matches_torchmetrics_and_the_unequal_size_formula() -> None:
    from torchmetrics.image.kid import KernelInceptionDistance

    proj = Projection()
    ev = FIDEvaluator(feature_extractor=proj, batch_size=16, kid=True)
    assert (ev.metric_name, ev.kid_name) == ("fd_custom", "kid_custom")
    real, fake = _images(60, seed=0), _images(60, seed=1) * 0.8 + 0.1
    ev.prepare([real[:25], real[25:]])
    out = ev.evaluate([fake])
    # torchmetrics' KID with one "subset" holding every image of both equal-sized sets
    reference = KernelInceptionDistance(feature=proj, subsets=1, subset_size=60, normalize=True)
    reference.update(real, real=True)
    reference.update(fake, real=False)
    assert out["kid_custom"] == pytest.approx(float(reference.compute()[0]), rel=1e-9)
    plain = FIDEvaluator(feature_extractor=proj)
    plain.prepare([real])
    assert out["fd_custom"] == pytest.approx(plain.evaluate([fake])["fd_custom"], rel=1e-12)
    # sets of different sizes: the unbiased MMD^2 written out pair by pair
    more = _images(37, seed=2)
    got = ev.evaluate([more])["kid_custom"]
    fr, ff = proj(real).double(), proj(more).double()

    def k(a, b):
        return (float(a @ b) / fr.shape[1] + 1.0) ** 3

    m, n = len(fr), len(ff)
    xx = sum(k(fr[i], fr[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(ff[i], ff[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    xy = sum(k(fr[i], ff[j]) for i in range(m) for j in range(n)) / (m * n)
    assert got == pytest.approx(xx + yy - 2 * xy, rel=1e-9)
    with pytest.raises(ConfigError, match="kid needs"):
        FIDEvaluator(feature_extractor=proj, kid=True, reference_stats=__file__)


def test_evaluator_rejects_bad_use(tmp_path) -> None:
    proj = Projection()
    with pytest.raises(RuntimeError, match="prepare"):
        FIDEvaluator(feature_extractor=proj).evaluate([_images(4)])
    ev = FIDEvaluator(feature_extractor=proj)
    ev.prepare([_images(10)])
    with pytest.raises(ConfigError, match="at least 2"):
        ev.evaluate([_images(1)])
    with pytest.raises(ConfigError):
        FIDEvaluator(features="clip")
    with pytest.raises(ConfigError):
        FIDEvaluator(feature_extractor=proj, weights_path="w.pth")
    with pytest.raises(ConfigError):
        FIDEvaluator(feature_extractor=proj, batch_size=0)
    with pytest.raises(ConfigError, match="num_features"):
        FIDEvaluator(feature_extractor=nn.Flatten())
    with pytest.raises(ConfigError, match="not found"):
        FIDEvaluator(feature_extractor=proj, reference_stats=tmp_path / "missing.npz")


# -- Inception -----------------------------------------------------------------------------
@pytest.mark.parametrize("weights_path", [None, "does/not/exist.pth"])
def test_inception_without_weights_fails_fast(weights_path) -> None:
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError) as info:
        FIDEvaluator(features="inception", weights_path=weights_path)
    assert time.monotonic() - start < 2.0
    message = str(info.value)
    assert "weights_path" in message and "https://" in message and "\n" not in message


def test_inception_with_unreadable_weights_file(tmp_path) -> None:
    bad = tmp_path / "weights.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsUnavailableError, match="weights_path"):
        FIDEvaluator(weights_path=bad)


@pytest.mark.slow  # ~10 s: a 2048-d InceptionV3 on CPU
def test_inception_path_with_stand_in_weights(tmp_path, monkeypatch) -> None:
    """Real InceptionV3 code, random weights: checks loading, RGB repeat and quantisation."""
    fe = pytest.importorskip("torch_fidelity.feature_extractor_inceptionv3")
    with monkeypatch.context() as patch:  # build the network without any weights file
        patch.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd: None)
        patch.setattr(fe.torch, "load", lambda *args, **kwargs: {})
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3("stand-in", ["2048"], "unused")
    # He-style gain so random activations do not vanish over ~50 layers
    state = {k: v * 2.45 if k.endswith("conv.weight") else v for k, v in net.state_dict().items()}
    torch.save(state, tmp_path / "inception.pth")

    ev = FIDEvaluator(weights_path=tmp_path / "inception.pth")
    assert ev.metric_name == "fid" and ev.num_features == 2048
    assert getattr(ev.metric.inception, "use_antialias", False) is False
    x = _images(4)
    ev.prepare([x])
    assert np.trace(ev.reference_statistics[1]) > 1e-3  # the features do depend on the image
    quantised = ((x * 255).round() / 255).expand(-1, 3, -1, -1)  # same uint8 images, as RGB
    assert ev.evaluate([quantised])["fid"] < 1e-6


# -- digit features ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("digits_cache")


@pytest.fixture(scope="module")
def digit_net(digits_cache) -> DigitFeatureExtractor:
    return DigitFeatureExtractor(cache_dir=digits_cache)


def test_digit_features_classify_held_out_digits(digit_net) -> None:
    assert digit_net.accuracy > 0.9
    x, y = digits_split("test")
    assert len(x) == 360 and x.shape[1:] == (1, 8, 8)
    assert float((digit_net.predict(x) == y).float().mean()) == pytest.approx(digit_net.accuracy)
    f = digit_net(x)
    assert f.shape == (360, digit_net.num_features) == (360, 64)
    # any channel count / size / dtype: RGB, 2x upsampling and uint8 give the same features
    big = x.repeat(1, 3, 1, 1).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    torch.testing.assert_close(digit_net(big), f, rtol=1e-5, atol=1e-5)
    q = (x * 255).round().to(torch.uint8)
    torch.testing.assert_close(digit_net(q), digit_net(q.float() / 255))
    assert digit_net(torch.randint(0, 255, (1, 3, 299, 299), dtype=torch.uint8)).shape == (1, 64)


def test_digit_features_training_is_deterministic_and_cached(digit_net, tmp_path) -> None:
    threads, rng_state = torch.get_num_threads(), torch.random.get_rng_state()
    again = DigitFeatureExtractor(cache_dir=tmp_path)
    assert torch.get_num_threads() == threads
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # caller's RNG untouched
    a, b = load_file(str(digit_net.weights_file)), load_file(str(again.weights_file))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.accuracy == digit_net.accuracy
    mtime = again.weights_file.stat().st_mtime_ns
    cached = DigitFeatureExtractor(cache_dir=tmp_path)  # loads, does not retrain
    assert cached.weights_file.stat().st_mtime_ns == mtime and cached.accuracy == again.accuracy
    assert list(tmp_path.iterdir()) == [again.weights_file]  # no temporary files left
    assert DigitFeatureConfig(epochs=1).key() != DigitFeatureConfig().key()


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert default_cache_dir().parts[-2:] == (".cache", "noisevalue")


def test_digit_fd_separates_real_digits_from_scrambled_ones(digit_net, digits_cache) -> None:
    ev = FIDEvaluator(features="digits", cache_dir=digits_cache, batch_size=128)
    assert ev.metric_name == "fd_digits"
    train, _ = digits_split("train")
    test, _ = digits_split("test")
    perm = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    shuffled = test.flatten(1)[:, perm].view_as(test)  # same pixel values, no digit shapes
    ev.prepare([train])
    fd_test = ev.evaluate([test])["fd_digits"]
    fd_shuffled = ev.evaluate([shuffled])["fd_digits"]
    assert ev.evaluate([train])["fd_digits"] < 1e-6
    assert 0 < fd_test and fd_shuffled > 10 * fd_test


def test_the_imagenet_recipes_score_against_adm_reference_batch(tmp_path) -> None:
    """FIDs comparable with published ones: the ImageNet recipes' reference is ADM's batch's
    statistics, and a missing copy is one line saying where the batch is published."""
    from noisevalue.config import load_recipe
    from noisevalue.errors import ConfigError

    for name in ("imagenet_cond", "imagenet_uncond"):
        params = load_recipe(name).eval.evaluators[0].params
        assert params["reference_stats"] == "reference/VIRTUAL_imagenet256_labeled.npz"
    with pytest.raises(ConfigError) as err:
        FIDEvaluator(features="digits", reference_stats=tmp_path / "VIRTUAL_imagenet256_labeled.npz")
    assert str(err.value).endswith("ref_batches/imagenet/256/VIRTUAL_imagenet256_labeled.npz")
