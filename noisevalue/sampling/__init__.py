"""``noisevalue sample`` and ``noisevalue eval``: drawing images from a trained checkpoint
(:mod:`.sample`) and scoring folders or archives of images (:mod:`.score`).

Built on :mod:`noisevalue.train`; independent of :mod:`noisevalue.experiments`. This file
imports nothing.
"""
