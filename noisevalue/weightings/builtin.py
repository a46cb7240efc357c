"""The built-in loss weightings (see the package docstring)."""

from __future__ import annotations

import math

import torch

from noisevalue.errors import ConfigError
from noisevalue.interfaces import LossWeighting, TimestepSampler


def _positive(name: str, key: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"loss weighting '{name}': {key} must be a finite number > 0, got {value!r}")
    return float(value)


class UniformTimesteps(TimestepSampler):
    """Timesteps uniform over the schedule: today's draws, unchanged."""

    def resample(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return t


class Uniform(LossWeighting):
    """Weight 1: the plain epsilon objective."""

    def weight(self, snr: torch.Tensor) -> torch.Tensor:
        return torch.ones_like(snr)


class MinSNR(LossWeighting):
    """Min-SNR-gamma for epsilon prediction: ``min(SNR, gamma) / SNR``, i.e. 1 where
    ``SNR <= gamma`` (and at SNR = 0) and ``gamma / SNR`` above: the low-noise timesteps,
    whose epsilon loss is small but whose gradients conflict, count less."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = _positive("min_snr", "gamma", gamma)

    def weight(self, snr: torch.Tensor) -> torch.Tensor:
        return torch.where(snr > self.gamma, self.gamma / snr.clamp_min(self.gamma), torch.ones_like(snr))


class P2(LossWeighting):
    """P2 weighting: ``1 / (k + SNR)^gamma`` (the paper's settings: k = 1, gamma = 0.5 or 1)."""

    def __init__(self, k: float = 1.0, gamma: float = 0.5) -> None:
        self.k = _positive("p2", "k", k)
        self.gamma = _positive("p2", "gamma", gamma)

    def weight(self, snr: torch.Tensor) -> torch.Tensor:
        return (self.k + snr).pow(-self.gamma)
