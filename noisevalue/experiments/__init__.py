"""Experiments: stages (one run in a folder of its own) and what is made of them: the
three-stage protocol, ``ablate``, ``transfer``, ``analyze`` and their tables.

Built on :mod:`noisevalue.train`; never imports :mod:`noisevalue.sampling`. This file
imports nothing.
"""
