"""One trainer (diffusion or rater meta-training) run in this process: setup, train,
evaluate, cleanup."""

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
