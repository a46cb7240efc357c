"""Noise Awareness Guidance (classifier-free NAG) for noisevalue: DiT backbones with a learned
null-time embedding. Training drops the time condition with ``time_dropout_prob`` (the
trainer's seeded mask); sampling guides with ``sample.nag_scale`` / ``--nag-scale``."""

from noisevalue_nag.backbone import NAGDiT

__all__ = ["NAGDiT"]
