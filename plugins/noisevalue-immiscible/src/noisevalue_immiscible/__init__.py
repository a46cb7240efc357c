"""Immiscible Diffusion (Li et al. 2024) as noisevalue selectors.

* ``immiscible``: re-pair the batch's noises to its images by a linear assignment that
  minimises the total L2 distance (``scipy.optimize.linear_sum_assignment``), so each image
  diffuses towards a nearby noise;
* ``immiscible_knn``: the KNN variant, per image the nearest of k i.i.d. candidates: the
  closest prior to NoiseRater's selection, with a fixed score instead of a learned one.
"""

from noisevalue_immiscible.selectors import ImmiscibleSelector, NearestNoiseSelector, assign

__all__ = ["ImmiscibleSelector", "NearestNoiseSelector", "assign"]
