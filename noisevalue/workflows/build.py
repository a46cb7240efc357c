"""Building a recipe's components from the registries, with errors naming recipe paths."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import torch

from noisevalue import registry
from noisevalue.config import Component, Recipe
from noisevalue.errors import ConfigError, UserError


def create(kind: str, comp: Component, where: str, **extra: Any) -> Any:
    """``registry.create`` whose errors say where in the recipe the component is named."""
    try:
        registry.get(kind, comp.name)
    except UserError as exc:
        raise type(exc)(f"{where}.name: {exc}") from None
    registry.check_params(kind, comp.name, comp.params, where=f"{where}.params")
    try:
        return registry.get(kind, comp.name)(**{**comp.params, **extra})
    except UserError as exc:
        if str(exc).startswith(where):
            raise
        raise type(exc)(f"{where} ({comp.name}): {exc}") from None


def build_evaluators(recipe: Recipe) -> list[Any]:
    """Evaluators are built before training, so missing weights fail at once."""
    return [
        create("evaluator", comp, f"eval.evaluators.{i}")
        for i, comp in enumerate(recipe.eval.evaluators)
    ]


def accepted_params(kind: str, name: str) -> set[str]:
    try:
        sig = inspect.signature(registry.get(kind, name))
    except (TypeError, ValueError):
        return set()
    return set(sig.parameters)


def shape_params(
    kind: str, comp: Component, where: str, latent_shape: tuple[int, int, int], num_classes: int
) -> dict:
    """A component's parameters with the data's shape and class count filled in.

    A value given explicitly in the recipe must agree with the data.
    """
    params = dict(comp.params)
    c, h, _ = latent_shape
    accepted = accepted_params(kind, comp.name)
    for key, value in (("input_size", h), ("in_channels", c), ("num_classes", num_classes)):
        if key in params and params[key] != value:
            raise ConfigError(
                f"{where}.params.{key}: {params[key]} does not match the data, which gives {value}"
            )
        if key in accepted:
            params[key] = value
    return params


def backbone_params(recipe: Recipe, latent_shape: tuple[int, int, int], num_classes: int) -> dict:
    return shape_params("backbone", recipe.model, "model", latent_shape, num_classes)


def build_backbone(recipe: Recipe, params: dict) -> torch.nn.Module:
    model = create("backbone", Component(name=recipe.model.name, params=params), "model")
    model.config_name = recipe.model.name
    return model


def checkpoint_backbone(path: Path, identity: dict, weights: str, where: str, label: str) -> torch.nn.Module:
    """The backbone that a checkpoint's ``meta.json`` names (``identity``: name and params),
    with the checkpoint's ``weights`` group (``model`` or ``ema``) loaded and checked;
    ``where`` names it in recipe errors, ``label`` in weight errors."""
    from noisevalue import checkpoint as ckpt

    model = create("backbone", Component(name=identity["name"], params=identity.get("params", {})), where)
    ckpt.load_state_into(model, ckpt.load_tensors(path, weights), label)
    return model


def image_to_unit(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 1], clamped."""
    return ((images.float() + 1) / 2).clamp(0, 1)
