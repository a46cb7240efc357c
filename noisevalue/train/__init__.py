"""Training: the two trainers (diffusion training and rater meta-training) on one base
(:mod:`.trainer`), and their plumbing (batches, data, evaluation, logs, progress).

Imports only the core and the component packages, never :mod:`noisevalue.experiments` or
:mod:`noisevalue.sampling`. This file imports nothing, so importing one module never pulls
in the others.
"""
