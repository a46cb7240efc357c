"""Group-wise normalisation of rater scores (paper §4.1)."""

from __future__ import annotations

import torch

__all__ = ["group_softmax"]


def group_softmax(scores: torch.Tensor) -> torch.Tensor:
    """Softmax over the ``K`` candidates of each group: ``[B, K]`` scores -> ``[B, K]``
    weights, each row summing to 1. Only differences within a group matter, so adding a
    constant to a row leaves its weights unchanged. Differentiable (the soft weighting of
    the inner loss during meta-training)."""
    if scores.ndim != 2:
        raise ValueError(f"group_softmax expects scores [groups, K], got {list(scores.shape)}")
    return torch.softmax(scores, dim=1)
