"""The experiment commands (``ablate``, ``transfer``, ``analyze``) by name, so the CLI and
each process started by ``torch.distributed.run`` dispatch them the same way."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo


def run_experiment(command: str, recipe: Recipe, info: DistInfo, options: dict[str, Any]) -> list[Path]:
    """Run one experiment command; returns the paths of its tables and figures."""
    say = print if info.is_main else (lambda *_: None)
    if command == "ablate":
        from noisevalue.workflows.ablate import run_ablate

        return run_ablate(recipe, info, say, **options)
    if command == "transfer":
        from noisevalue.workflows.transfer import run_transfer

        return run_transfer(recipe, info, say, **options)
    if command == "analyze":
        from noisevalue.workflows.analyze import run_analyze

        return run_analyze(recipe, info, say, **options)
    raise ValueError(f"unknown experiment command '{command}'")
