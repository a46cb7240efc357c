"""A parameter-free rater: the signed L2 norm of the noise (the naive baselines)."""

from __future__ import annotations

import torch

from noisevalue.errors import ConfigError
from noisevalue.interfaces import Rater

__all__ = ["NormRater"]


class NormRater(Rater):
    """``score = sign * ||noise||_2`` per sample; ``sign=+1`` prefers large-norm noise,
    ``sign=-1`` small-norm noise. Ignores ``t``, ``x0`` and ``y``; has no parameters and
    fits any latent shape and class count (``latent_shape`` and ``num_classes`` are None).
    """

    def __init__(self, sign: int = 1):
        super().__init__()
        if sign not in (1, -1):
            raise ConfigError(f"rater 'norm': sign must be +1 or -1, got {sign!r}")
        self.sign = int(sign)
        self.latent_shape = None  # type: ignore[assignment]
        self.num_classes = None  # type: ignore[assignment]
        self.config = {"sign": self.sign}

    def forward(
        self,
        noise: torch.Tensor,
        t: torch.Tensor | None = None,
        x0: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.sign * torch.linalg.vector_norm(noise.flatten(1), dim=1)
