"""A stochastic selector: sample one of k candidates with probability softmax(score / T)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from noisevalue.interfaces import Rater
from noisevalue.selectors import RaterSelector


class SoftmaxRaterSelector(RaterSelector):
    """Draws candidate ``j`` with probability ``softmax(scores / temperature)_j`` instead of
    taking the top-1: the rater's preference, softened. ``temperature`` > 0; as it goes to 0
    this becomes the built-in ``rater`` selector.

    Inherits ``needs_rater = "trained"``: the protocol, ``ablate`` and ``transfer`` fill
    ``checkpoint`` with the rater meta-trained for the run's seed. All randomness comes from
    the ``generator`` the trainer passes (seeded by seed, step and rank), so a resumed run
    draws exactly what an uninterrupted run draws.
    """

    def __init__(
        self,
        k: int = 4,
        temperature: float = 1.0,
        checkpoint: str | Path | None = None,
        rater: Rater | nn.Module | None = None,
        batch_size: int | None = None,
    ) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__(k=k, checkpoint=checkpoint, rater=rater, batch_size=batch_size)
        self.temperature = float(temperature)

    def probabilities(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """``[N, k]`` selection probabilities."""
        return torch.softmax(self.scores(x0, y, t, candidates).double() / self.temperature, dim=1)

    @torch.no_grad()
    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        probs = self.probabilities(x0, y, t, candidates).cpu()
        # drawn on the CPU, from the trainer's generator, whatever the device
        pick = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        return pick.to(candidates.device)
