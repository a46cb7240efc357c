"""Noise selectors (choose one of ``k`` candidate noises) and the group-wise weighting.

Built-in selectors are registered under the ``noisevalue.selectors`` entry-point group:
``random`` (vanilla i.i.d. noise), ``max_norm``, ``min_norm`` and ``rater`` (top-1 of k by
a frozen rater).
"""

from __future__ import annotations

from noisevalue.selectors.builtin import (
    MaxNormSelector,
    MinNormSelector,
    RandomSelector,
    RaterSelector,
)
from noisevalue.selectors.weighting import group_softmax

__all__ = [
    "RandomSelector",
    "MaxNormSelector",
    "MinNormSelector",
    "RaterSelector",
    "group_softmax",
]
