"""Statistics of a rater's scores over a group of candidate noises (paper section 5.3).

For each (image, timestep) the rater scores K candidate noises. Two statistics per group:

* the Spearman rank correlation between the scores and the candidates' L2 norms: the
  Pearson correlation of their *average ranks* (tied values share the mean of the ranks
  they occupy, as in ``scipy.stats.spearmanr``). It is undefined (NaN) when either side is
  constant, e.g. a rater that gives every candidate the same score;
* the standard deviation of the scores across the K candidates; ``ddof=1`` (the sample,
  unbiased-variance standard deviation) by default, since the paper does not say.

Both are vectorised over any leading dimensions: the candidates lie along the last one.
Aggregation (:func:`summarize`) drops undefined values and counts them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

SCORE_STD_DDOF = 1  # the sample standard deviation (unbiased variance), documented in docs/analyze.md


def discrete_timestep(t: float, num_timesteps: int) -> int:
    """The diffusion step of a normalised timestep ``t`` in [0, 1]: ``t * (T - 1)`` rounded
    half up, so 0.0 is step 0 and 1.0 is step ``T - 1``."""
    if not 0.0 <= t <= 1.0:
        raise ValueError(f"normalised timestep {t} is not in [0, 1]")
    return int(math.floor(t * (num_timesteps - 1) + 0.5))


def discrete_timesteps(ts: Sequence[float], num_timesteps: int) -> list[int]:
    return [discrete_timestep(float(t), num_timesteps) for t in ts]


def average_ranks(x: torch.Tensor) -> torch.Tensor:
    """1-based ranks along the last dimension, ties given the mean of their ranks (float64).

    A value's rank is (how many are smaller) + (how many are equal, itself included, + 1) / 2.
    Exact for ties, O(K^2) per row: meant for small K (candidate groups)."""
    x = x.double()
    less = (x.unsqueeze(-1) > x.unsqueeze(-2)).sum(-1)  # [..., i]: #{j: x_j < x_i}
    equal = (x.unsqueeze(-1) == x.unsqueeze(-2)).sum(-1)
    return less.double() + (equal.double() + 1) / 2


def pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along the last dimension (float64); NaN where either side is constant."""
    a, b = a.double(), b.double()
    a = a - a.mean(-1, keepdim=True)
    b = b - b.mean(-1, keepdim=True)
    den = torch.sqrt((a * a).sum(-1) * (b * b).sum(-1))
    num = (a * b).sum(-1)
    out = num / den
    return torch.where(den > 0, out.clamp(-1.0, 1.0), torch.full_like(out, math.nan))


def spearman(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spearman correlation along the last dimension: Pearson of average ranks (ties
    handled); NaN where either side is constant. Shapes broadcast."""
    a, b = torch.broadcast_tensors(a, b)
    return pearson(average_ranks(a), average_ranks(b))


def score_std(scores: torch.Tensor, ddof: int = SCORE_STD_DDOF) -> torch.Tensor:
    """Standard deviation along the last dimension (float64) with ``ddof`` (1: sample std)."""
    return torch.std(scores.double(), dim=-1, correction=ddof)


def noise_norms(noise: torch.Tensor) -> torch.Tensor:
    """L2 norm of each candidate noise ``[..., K, C, H, W] -> [..., K]`` (float64)."""
    return torch.linalg.vector_norm(noise.double().flatten(-3), dim=-1)


def candidate_stats(scores: torch.Tensor, norms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Spearman of scores vs norms, score std) per group; scores ``[..., K]``, norms
    broadcastable to them (e.g. ``[N, 1, K]`` against scores ``[N, T, K]``)."""
    return spearman(scores, norms), score_std(scores)


STAT_FIELDS = ("count", "undefined", "mean", "median", "q1", "q3")


def summarize(values: np.ndarray | Sequence[float]) -> dict[str, float | int]:
    """count (defined values), undefined (NaN, excluded), mean, median, quartiles
    (numpy's linear interpolation); the location statistics are NaN when nothing is defined."""
    arr = np.asarray(values, dtype=np.float64).ravel()
    ok = arr[~np.isnan(arr)]
    out: dict[str, float | int] = {"count": int(ok.size), "undefined": int(arr.size - ok.size)}
    if ok.size == 0:
        out.update(mean=math.nan, median=math.nan, q1=math.nan, q3=math.nan)
    else:
        q1, med, q3 = np.percentile(ok, [25, 50, 75])
        out.update(mean=float(ok.mean()), median=float(med), q1=float(q1), q3=float(q3))
    return out
