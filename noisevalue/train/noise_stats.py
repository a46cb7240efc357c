"""What a selector does to the training noise, measured: per timestep bin, the noise each
sample trained on against what an i.i.d. Gaussian draw would give.

For a noise ``eps`` of ``d`` coordinates, a Gaussian draw has ``||eps||`` chi-distributed
with ``d`` degrees of freedom. Per bin of ``t`` (``BINS`` equal bins over the diffusion
steps) the accumulator keeps, summed over the samples of the run:

* ``norm_ratio``: ``||eps|| / E[chi_d]``, 1 for Gaussian noise
  (``E[chi_d] = sqrt(2) Gamma((d+1)/2) / Gamma(d/2)``);
* ``pit``: the probability-integral transform ``F_chi_d(||eps||) =
  P(d/2, ||eps||^2 / 2)`` (the regularised lower incomplete gamma function), uniform on
  [0, 1] for Gaussian noise: mean 1/2, variance 1/12. A top-1-of-k pick by norm moves it to
  the Beta(k, 1) or Beta(1, k) law (mean k/(k+1) or 1/(k+1)), whatever ``d``;
* per coordinate, the sum and the sum of squares of ``eps``: the per-coordinate variance
  of the noise trained on (unbiased, over the bin's samples; 1 for Gaussian noise),
  summarised by its mean, min and max over the coordinates;
* ``gain``: where the selector reports one (``NoiseSelector.last_gain``: the oracle's
  first-order gain of its pick over candidate 0, the alignment difference), its sum.

Everything stays on the device during the steps (no host read); the sums are reduced over
processes when a checkpoint is written, saved with it, and written to ``noise_stats.json``.
"""

from __future__ import annotations

import math

import torch

from noisevalue.distributed import DistInfo, all_reduce_sum

__all__ = ["BINS", "NoiseStats", "chi_mean", "summary"]

BINS = 10
GROUP = "noise_stats"  # the checkpoint's tensor group
FILE = "noise_stats.json"


def chi_mean(d: int) -> float:
    """``E[||eps||]`` for ``eps ~ N(0, I_d)``: ``sqrt(2) Gamma((d+1)/2) / Gamma(d/2)``."""
    return math.sqrt(2.0) * math.exp(math.lgamma((d + 1) / 2) - math.lgamma(d / 2))


class NoiseStats:
    """Sums over the trained-on noise per timestep bin (see the module docstring)."""

    SCALARS = ("count", "norm_ratio", "pit", "pit_sq", "gain", "gain_count")

    def __init__(self, shape: tuple[int, ...], num_timesteps: int, device: torch.device | str = "cpu") -> None:
        self.d = math.prod(shape)
        self.num_timesteps = num_timesteps
        self.chi = chi_mean(self.d)
        self.scalars = torch.zeros(len(self.SCALARS), BINS, dtype=torch.float64, device=device)
        self.coord_sum = torch.zeros(BINS, self.d, dtype=torch.float64, device=device)
        self.coord_sq = torch.zeros(BINS, self.d, dtype=torch.float64, device=device)

    def bins(self, t: torch.Tensor) -> torch.Tensor:
        return (t.long() * BINS // self.num_timesteps).clamp(0, BINS - 1)

    @torch.no_grad()
    def add(self, noise: torch.Tensor, t: torch.Tensor, gain: torch.Tensor | None = None) -> None:
        """Add a batch: ``noise`` ``[N, *shape]`` trained on at timesteps ``t`` ``[N]``;
        ``gain`` ``[N]`` where the selector reports it."""
        flat = noise.detach().flatten(1).double()
        b = self.bins(t)
        sq = flat.square().sum(1)
        norm = sq.sqrt()
        pit = torch.special.gammainc(torch.full_like(sq, self.d / 2), sq / 2)
        rows = [torch.ones_like(norm), norm / self.chi, pit, pit.square()]
        if gain is None:
            rows += [torch.zeros_like(norm)] * 2
        else:
            rows += [gain.detach().double(), torch.ones_like(norm)]
        self.scalars.index_add_(1, b, torch.stack(rows))
        self.coord_sum.index_add_(0, b, flat)
        self.coord_sq.index_add_(0, b, flat.square())

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"scalars": self.scalars, "coord_sum": self.coord_sum, "coord_sq": self.coord_sq}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for name, value in state.items():
            getattr(self, name).copy_(value)

    def reduced(self, info: DistInfo) -> dict[str, torch.Tensor]:
        """The sums over every process (a collective: every rank calls it)."""
        return {name: all_reduce_sum(value.clone(), info) for name, value in self.state_dict().items()}

    def clear(self) -> None:
        for value in self.state_dict().values():
            value.zero_()


def summary(state: dict[str, torch.Tensor]) -> dict:
    """JSON-ready figures from (reduced) sums: per bin and over all bins, the count, the mean
    norm ratio, the PIT's mean and variance, the per-coordinate variance (mean, min, max over
    coordinates) and the mean gain where reported."""
    scalars = state["scalars"].cpu()
    coord_sum, coord_sq = state["coord_sum"].cpu(), state["coord_sq"].cpu()

    def figures(s: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor) -> dict:
        count, norm, pit, pit_sq, gain, gain_count = (float(v) for v in s)
        if count == 0:
            return {"count": 0}
        out = {"count": int(count), "norm_ratio": norm / count, "pit_mean": pit / count,
               "pit_var": pit_sq / count - (pit / count) ** 2}
        if count > 1:  # the unbiased variance of each coordinate over the samples
            var = (c2 - c1.square() / count) / (count - 1)
            out.update(coord_var_mean=float(var.mean()), coord_var_min=float(var.min()),
                       coord_var_max=float(var.max()))
        if gain_count:
            out["gain"] = gain / gain_count
        return out

    per_bin = [figures(scalars[:, b], coord_sum[b], coord_sq[b]) for b in range(BINS)]
    return {"bins": BINS, "per_bin": per_bin,
            "all": figures(scalars.sum(1), coord_sum.sum(0), coord_sq.sum(0))}
