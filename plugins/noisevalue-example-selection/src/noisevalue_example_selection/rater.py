"""A small convolutional rater: the scoring network of NoiseRater at its simplest."""

from __future__ import annotations

import math

import torch
from torch import nn

from noisevalue.interfaces import Rater


class ConvRater(Rater):
    """Scores a candidate noise from two convolutions over ``[noise, x0]``, modulated by
    embeddings of the timestep and the class, pooled to one number.

    ``input_size``, ``in_channels`` and ``num_classes`` are the shape keywords noisevalue
    fills from the data; ``width`` is the channel count (>= 1).
    """

    cheap_to_build = True  # small: `recipe validate` builds it once to check the values

    def __init__(
        self,
        input_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 32,
        num_frequencies: int = 8,
    ) -> None:
        if width < 1:
            raise ValueError(f"width must be an integer >= 1, got {width}")
        if num_frequencies < 1:
            raise ValueError(f"num_frequencies must be an integer >= 1, got {num_frequencies}")
        super().__init__()
        self.latent_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.num_frequencies = num_frequencies
        self.features = nn.Sequential(
            nn.Conv2d(2 * in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
        )
        self.time = nn.Linear(2 * num_frequencies, 2 * width)
        # one extra row: the null label that classifier-free dropout substitutes
        self.label = nn.Embedding(num_classes + 1, 2 * width) if num_classes else None
        self.head = nn.Linear(width, 1)

    def forward(
        self, noise: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, y: torch.Tensor | None
    ) -> torch.Tensor:
        freqs = torch.exp(-math.log(1000.0) * torch.arange(self.num_frequencies, device=t.device) / self.num_frequencies)
        angles = t.float()[:, None] * freqs[None]
        cond = self.time(torch.cat([angles.cos(), angles.sin()], dim=1))
        if self.label is not None and y is not None:
            cond = cond + self.label(y)
        scale, shift = cond.chunk(2, dim=1)
        pooled = self.features(torch.cat([noise, x0], dim=1)).mean(dim=(2, 3))
        return self.head(pooled * (1 + scale) + shift).squeeze(1)
