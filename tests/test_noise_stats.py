"""The noise diagnostics against closed forms: the chi distribution's mean and CDF, the
per-coordinate variance, and the laws of a top-1-of-k pick by norm (Beta(1, k), Beta(k, 1))."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from noisevalue.train.noise_stats import BINS, NoiseStats, chi_mean, summary


@pytest.mark.parametrize("d", [1, 2, 64, 1024, 4096])
def test_chi_mean_matches_scipy(d):
    assert chi_mean(d) == pytest.approx(stats.chi(d).mean(), rel=1e-12)


def test_sums_per_bin_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(50, 1, 3, 2, generator=g) * torch.linspace(0.5, 1.5, 50)[:, None, None, None]
    t = torch.randint(0, 1000, (50,), generator=g)
    gain = torch.rand(50, generator=g)
    acc = NoiseStats((1, 3, 2), 1000)
    acc.add(noise[:20], t[:20], gain[:20])
    acc.add(noise[20:], t[20:])  # a selector without a gain
    out = summary(acc.state_dict())
    flat = noise.flatten(1).double().numpy()
    norms = np.linalg.norm(flat, axis=1)
    bins = (t.numpy() * BINS) // 1000
    for b in range(BINS):
        rows = bins == b
        got = out["per_bin"][b]
        assert got["count"] == rows.sum()
        if not rows.any():
            continue
        pit = stats.chi(6).cdf(norms[rows])
        assert got["norm_ratio"] == pytest.approx((norms[rows] / stats.chi(6).mean()).mean(), rel=1e-10)
        assert got["pit_mean"] == pytest.approx(pit.mean(), rel=1e-9)
        assert got["pit_var"] == pytest.approx(pit.var(), abs=1e-9)
        with_gain = rows & (np.arange(50) < 20)
        if with_gain.any():
            assert got["gain"] == pytest.approx(gain.numpy()[with_gain].mean(), rel=1e-6)
        else:
            assert "gain" not in got
        if rows.sum() < 2:
            assert "coord_var_mean" not in got
            continue
        var = flat[rows].var(axis=0, ddof=1)
        assert got["coord_var_mean"] == pytest.approx(var.mean(), rel=1e-9)
        assert got["coord_var_min"] == pytest.approx(var.min(), rel=1e-9)
        assert got["coord_var_max"] == pytest.approx(var.max(), rel=1e-9)
    assert out["all"]["count"] == 50


@pytest.mark.parametrize("d", [64, 1024])
def test_gaussian_noise_is_uniform_in_pit_and_a_top1_of_4_by_norm_is_beta(d):
    """Whatever d, the PIT of an i.i.d. draw is U(0, 1) (mean 1/2, variance 1/12) and the
    smallest (largest) of k=4 has the law Beta(1, 4) (Beta(4, 1)): mean 1/5 (4/5)."""
    g = torch.Generator().manual_seed(1)
    n, k = 4000, 4
    pool = torch.randn(n, k, d, generator=g)
    t = torch.zeros(n, dtype=torch.long)
    norms = pool.norm(dim=2)
    picks = {"iid": pool[:, 0], "min": pool[torch.arange(n), norms.argmin(1)],
             "max": pool[torch.arange(n), norms.argmax(1)]}
    out = {}
    for name, noise in picks.items():
        acc = NoiseStats((d,), 1000)
        acc.add(noise, t)
        out[name] = summary(acc.state_dict())["all"]
    se = math.sqrt(1 / 12 / n)
    assert abs(out["iid"]["pit_mean"] - 0.5) < 4 * se and abs(out["iid"]["pit_var"] - 1 / 12) < 0.01
    beta_sd = math.sqrt(stats.beta(1, k).var() / n)
    assert abs(out["min"]["pit_mean"] - 1 / (k + 1)) < 4 * beta_sd
    assert abs(out["max"]["pit_mean"] - k / (k + 1)) < 4 * beta_sd
    assert abs(out["iid"]["norm_ratio"] - 1) < 4 / math.sqrt(2 * d * n)  # sd(chi_d) ~ 1/sqrt(2)
    assert abs(out["iid"]["coord_var_mean"] - 1) < 0.01
    # the shift in variance a pick by norm makes shrinks with d: -18% at d=64, -4.5% at 1,024, -2.3% at 4,096
    assert out["min"]["coord_var_mean"] < out["iid"]["coord_var_mean"] < out["max"]["coord_var_mean"]
