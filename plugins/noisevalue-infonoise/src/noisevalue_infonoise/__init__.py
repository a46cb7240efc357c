"""InfoNoise (online adaptive timestep distribution) as a noisevalue timestep sampler."""

from noisevalue_infonoise.plot import plot_density
from noisevalue_infonoise.sampler import InfoNoise

__all__ = ["InfoNoise", "plot_density"]
