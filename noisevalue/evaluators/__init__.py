"""Evaluators: score generated images against a reference set.

* :class:`~noisevalue.evaluators.fid.FIDEvaluator` (registered as ``fid``): Fréchet
  distance in a feature space, with torchmetrics as the engine. ``features="inception"``
  is the standard FID (reported as ``"fid"``; needs a local InceptionV3 weights file as
  ``weights_path``, nothing is downloaded); ``features="digits"`` uses a small classifier
  trained on the 8x8 digits training split (reported as ``"fd_digits"``, not an FID), and
  ``features="digits32"`` the same on the jittered 32x32 digits (``"fd_digits32"``).
* :func:`~noisevalue.evaluators.fid.frechet_distance` and
  :func:`~noisevalue.evaluators.fid.feature_statistics`: the float64 building blocks.
* :class:`~noisevalue.evaluators.digit_features.DigitFeatureExtractor`: the download-free
  digit feature network, cached on disk after a few seconds of deterministic training.
"""

from noisevalue.evaluators.digit_features import DigitFeatureConfig, DigitFeatureExtractor
from noisevalue.evaluators.fid import FIDEvaluator, feature_statistics, frechet_distance

__all__ = [
    "DigitFeatureConfig",
    "DigitFeatureExtractor",
    "FIDEvaluator",
    "feature_statistics",
    "frechet_distance",
]
