"""An example noisevalue plugin."""
