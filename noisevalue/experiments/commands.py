"""What ``noisevalue run`` and the experiment commands do with a recipe, by name, so the
CLI and each process started by ``torch.distributed.run`` dispatch them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo


def run_workflow(recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool) -> dict:
    """Run the recipe's workflow (one trainer, or the three-stage protocol); returns its
    final metrics."""
    if recipe.workflow == "protocol":
        from noisevalue.experiments.protocol import run_protocol

        return run_protocol(recipe, info)
    from noisevalue.train.run import run_trainer

    return run_trainer(recipe, run_dir, info, resume)


def run_experiment(command: str, recipe: Recipe, info: DistInfo, options: dict[str, Any]) -> list[Path]:
    """Run one experiment command (``ablate``, ``transfer``, ``compare``, ``analyze``, ``ladder``); returns the paths
    of its tables and figures."""
    say = print if info.is_main else (lambda *_: None)
    if command == "ablate":
        from noisevalue.experiments.ablate import run_ablate

        return run_ablate(recipe, info, say, **options)
    if command == "transfer":
        from noisevalue.experiments.transfer import run_transfer

        return run_transfer(recipe, info, say, **options)
    if command == "compare":
        from noisevalue.experiments.compare import run_compare

        return run_compare(recipe, info, say, **options)
    if command == "analyze":
        from noisevalue.experiments.analyze import run_analyze

        return run_analyze(recipe, info, say, **options)
    if command == "ladder":
        from noisevalue.experiments.ladder import run_ladder

        return run_ladder(recipe, info, say, **options)
    raise ValueError(f"unknown experiment command '{command}'")
