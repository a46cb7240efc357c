"""noisevalue: training-time noise valuation for diffusion models."""

__version__ = "0.1.0"
