"""Workflows: what ``noisevalue run`` does with a recipe.

``pretrain`` (diffusion training, also used for continuations with a noise selector),
``meta_train`` (rater meta-training) and ``protocol`` (the three stages and a comparison).
:func:`noisevalue.workflows.dispatch.run_workflow` picks one; this package file imports
nothing, so importing any workflow module never pulls in the others.
"""
