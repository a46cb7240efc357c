"""A whole-image MLP denoiser: small enough to read in one sitting."""

from __future__ import annotations

import math

import torch
from torch import nn

from noisevalue.interfaces import Backbone


class MLPDenoiser(Backbone):
    def __init__(
        self,
        input_size: int = 8,
        in_channels: int = 1,
        num_classes: int = 10,
        hidden: int = 256,
        class_dropout_prob: float = 0.1,
    ) -> None:
        super().__init__()
        self.input_size, self.in_channels, self.out_channels = input_size, in_channels, in_channels
        self.num_classes, self.patch_size, self.learn_sigma = num_classes, 1, False
        self.class_dropout_prob = class_dropout_prob
        dim = in_channels * input_size * input_size
        self.t_proj = nn.Linear(64, hidden)
        self.y_embed = nn.Embedding(num_classes + 1, hidden) if num_classes else None
        self.net = nn.Sequential(
            nn.Linear(dim + hidden, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
            nn.Linear(hidden, dim),
        )

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        half = 32
        freqs = torch.exp(-math.log(10000) * torch.arange(half, device=x.device) / half)
        args = t.float()[:, None] * freqs[None]
        h = self.t_proj(torch.cat([args.cos(), args.sin()], dim=1))
        if self.y_embed is not None and y is not None:
            h = h + self.y_embed(y)
        out = self.net(torch.cat([x.flatten(1), h], dim=1))
        return out.view_as(x)
