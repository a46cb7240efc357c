"""``noisevalue sample`` and ``noisevalue eval`` (registered on the app in :mod:`noisevalue.cli`)."""

from __future__ import annotations

import typer


def sample() -> None:
    """Draw DDIM samples from a run or checkpoint (not implemented yet)."""
    raise typer.Exit(2)


def evaluate() -> None:
    """Score samples against reference statistics (not implemented yet)."""
    raise typer.Exit(2)
