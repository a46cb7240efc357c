"""The workflow a recipe names: a single trainer, or the three-stage protocol."""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo
from noisevalue.workflows.single import run_single


def run_workflow(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """Run the recipe's workflow; returns its final metrics."""
    if recipe.workflow == "protocol":
        from noisevalue.workflows.protocol import run_protocol

        return run_protocol(recipe, info)
    return run_single(recipe, run_dir, info, resume)
