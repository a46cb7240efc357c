"""Noise selectors: choose one of ``k`` candidate noises per training sample.

Built-in selectors are registered under the ``noisevalue.selectors`` entry-point group:
``random`` (vanilla i.i.d. noise), ``max_norm``, ``min_norm``, ``rater`` (top-1 of k by a
frozen, meta-trained rater) and two controls: ``random_rater`` (top-1 by the same rater
before training) and ``oracle`` (top-1 by the exact gradient alignment with the validation
loss: greedy one-step alignment, a control for small models, not a bound), with
``oracle_precond`` its variant in the metric of the optimizer that takes the step (Adam's
diagonal preconditioner).
"""

from __future__ import annotations

from noisevalue.selectors.builtin import (
    MaxNormSelector,
    MinNormSelector,
    RandomSelector,
    RaterSelector,
    UntrainedRaterSelector,
)
from noisevalue.selectors.oracle import (
    OracleSelector,
    PreconditionedOracleSelector,
    alignment_scores,
)

__all__ = [
    "RandomSelector",
    "MaxNormSelector",
    "MinNormSelector",
    "RaterSelector",
    "UntrainedRaterSelector",
    "OracleSelector",
    "PreconditionedOracleSelector",
    "alignment_scores",
]
