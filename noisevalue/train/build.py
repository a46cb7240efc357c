"""Building a recipe's components from the registries, with errors naming recipe paths."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from noisevalue import registry
from noisevalue.checkpoint import Identity
from noisevalue.config import Recipe
from noisevalue.interfaces import Backbone


def build_evaluators(recipe: Recipe, device: torch.device | None = None) -> list[Any]:
    """Evaluators are built before training, so missing weights fail at once. ``device``:
    the run's, where an evaluator that takes a ``device`` and was given none computes its
    features."""
    out = []
    for i, comp in enumerate(recipe.eval.evaluators):
        if device is not None and "device" not in comp.params and "device" in registry.accepted("evaluator", comp.name):
            comp = comp.model_copy(update={"params": {**comp.params, "device": str(device)}})
        out.append(registry.build("evaluator", comp, where=f"eval.evaluators.{i}"))
    return out


def backbone_params(recipe: Recipe, latent_shape: tuple[int, int, int], num_classes: int) -> dict:
    return registry.with_shapes("backbone", recipe.model, "model", latent_shape, num_classes)


def build_backbone(recipe: Recipe, params: dict) -> Backbone:
    model = registry.build("backbone", registry.Named(recipe.model.name, params), where="model")
    model.config_name = recipe.model.name
    return model


def checkpoint_backbone(path: Path, identity: Identity, weights: str, where: str, label: str) -> Backbone:
    """The backbone that a checkpoint's ``meta.json`` names (``identity``),
    with the checkpoint's ``weights`` group (``model`` or ``ema``) loaded and checked;
    ``where`` names it in recipe errors, ``label`` in weight errors."""
    from noisevalue import checkpoint as ckpt

    model = registry.build("backbone", registry.Named(identity.name, identity.params), where=where)
    ckpt.load_state_into(model, ckpt.load_tensors(path, weights), label)
    return model


def image_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)
