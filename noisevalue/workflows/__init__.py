"""Workflows: what ``noisevalue run`` does with a recipe (pretrain, meta-train, ...)."""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo


def run_workflow(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """Run the recipe's workflow in this process (one rank); returns final metrics."""
    from noisevalue.workflows.pretrain import DiffusionTraining

    trainer = DiffusionTraining(recipe, run_dir, info, resume=resume)
    try:
        trainer.setup()
        trainer.train()
        return trainer.evaluate()
    finally:
        trainer.cleanup()
