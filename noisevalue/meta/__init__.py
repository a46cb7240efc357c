"""Rater meta-gradients: the bilevel problem and the engines that differentiate it.

* :func:`~noisevalue.meta.problem.make_problem` builds the :class:`BilevelProblem` of one
  outer step (group-softmax-weighted inner loss, plain validation loss).
* :class:`Unrolled` (``reverse`` or MixFlow-MG-style ``mixed`` mode),
  :class:`Implicit` (Theorem 4.1) and :class:`OneStep` (Theorem 4.2) compute
  ``d L_val(theta_S(eta)) / d eta``; they are registered as meta-optimizers
  ``unrolled``, ``implicit`` and ``one_step``.
"""

from noisevalue.meta.implicit import Implicit
from noisevalue.meta.inner import InnerOptimizer, make_inner_optimizer, unroll
from noisevalue.meta.one_step import OneStep
from noisevalue.meta.problem import (
    GroupedBatch,
    PlainBatch,
    group_scores,
    group_stats,
    group_weights,
    make_problem,
    math_sdpa,
    meta_attention,
    param_dict,
    weighted_group_loss,
)
from noisevalue.meta.unrolled import Unrolled

__all__ = [
    "GroupedBatch",
    "PlainBatch",
    "make_problem",
    "param_dict",
    "group_scores",
    "group_weights",
    "group_stats",
    "weighted_group_loss",
    "math_sdpa",
    "meta_attention",
    "InnerOptimizer",
    "make_inner_optimizer",
    "unroll",
    "Unrolled",
    "Implicit",
    "OneStep",
]
