"""Workflows: what ``noisevalue run`` does with a recipe.

``pretrain`` (diffusion training, also used for continuations with a noise selector),
``meta_train`` (rater meta-training) and ``protocol`` (the three stages and a comparison).
"""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo


def run_single(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """One recipe class (setup / train / evaluate / cleanup) in this process (one rank)."""
    from noisevalue.workflows.diffusion_training import DiffusionTraining
    from noisevalue.workflows.meta_train import RaterMetaTraining

    cls = RaterMetaTraining if recipe.workflow == "meta_train" else DiffusionTraining
    trainer = cls(recipe, run_dir, info, resume=resume)
    try:
        trainer.setup()
        trainer.train()
        return trainer.evaluate()
    finally:
        trainer.cleanup()


def run_workflow(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """Run the recipe's workflow; returns its final metrics."""
    if recipe.workflow == "protocol":
        from noisevalue.workflows.protocol import run_protocol

        return run_protocol(recipe, info)
    return run_single(recipe, run_dir, info, resume)
