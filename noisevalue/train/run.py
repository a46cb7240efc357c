"""The trainer a recipe's workflow names, run in this process (one rank)."""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo
from noisevalue.train.diffusion_training import DiffusionTraining
from noisevalue.train.meta_training import RaterMetaTraining
from noisevalue.train.trainer import Trainer

TRAINERS: dict[str, type[Trainer]] = {"pretrain": DiffusionTraining, "meta_train": RaterMetaTraining}


def run_trainer(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """Run the recipe's trainer (``pretrain`` or ``meta_train``); returns its final metrics."""
    return TRAINERS[recipe.workflow](recipe, run_dir, info, resume=resume).run()
