"""The two Immiscible selectors and the assignment they rest on."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from scipy.optimize import linear_sum_assignment

from noisevalue.interfaces import NoiseSelector


def _check_k(name: str, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"selector '{name}': k must be an integer >= 1, got {k!r}")
    return k


def distances(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Pairwise L2 distances ``[len(x0), len(noise)]`` between flattened images and noises,
    in float64 (ties in lower precision would make the assignment depend on rounding)."""
    return torch.cdist(x0.flatten(1).double(), noise.flatten(1).double())


def assign(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """For each image, the index of its noise under the assignment of minimum total L2
    distance (``len(noise) >= len(x0)``; each noise used at most once), long ``[len(x0)]``."""
    cost = distances(x0, noise).cpu().numpy()
    rows, cols = linear_sum_assignment(cost)
    pick = torch.empty(len(x0), dtype=torch.long)
    pick[torch.as_tensor(rows)] = torch.as_tensor(cols, dtype=torch.long)
    return pick.to(x0.device)


class ImmiscibleSelector(NoiseSelector):
    """Batch assignment: the ``N * k`` candidates of the process's batch are assigned to its
    N images by minimum total L2 distance (k = 1: the paper's re-pairing of the batch's
    noises; k > 1: N of a larger pool). Deterministic."""

    pool: ClassVar[Literal["sample", "batch"]] = "batch"

    def __init__(self, k: int = 1) -> None:
        self.k = _check_k("immiscible", k)

    def select(self, x0, y, t, candidates, *, generator=None) -> torch.Tensor:
        return assign(x0, candidates.flatten(0, 1))


class NearestNoiseSelector(NoiseSelector):
    """KNN Immiscible: of each image's k candidates, the one nearest to it in L2."""

    def __init__(self, k: int = 4) -> None:
        self.k = _check_k("immiscible_knn", k)

    def select(self, x0, y, t, candidates, *, generator=None) -> torch.Tensor:
        d = (candidates.double() - x0.double().unsqueeze(1)).flatten(2).pow(2).sum(-1)
        return d.argmin(dim=1)
