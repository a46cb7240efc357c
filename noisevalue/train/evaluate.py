"""Sampling a trained model and scoring the samples: grids, evaluators, metrics file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from noisevalue.checkpoint import atomic_file, atomic_write_text
from noisevalue.config import Recipe
from noisevalue.diffusion import Diffusion, ddim_sample, guided_eps
from noisevalue.train.batches import (
    STREAM_EVAL,
    STREAM_HELDOUT,
    STREAM_SAMPLE,
    seeded_generator,
)
from noisevalue.train.build import image_to_unit
from noisevalue.train.data import dataset_images, reference_images, reference_items

HELDOUT_LOSS = "heldout_loss"  # the primary metric of every comparison table
HELDOUT_SEED = 0  # not the run's seed: every run, method and seed scores the same set


@torch.no_grad()
def generate(
    model: torch.nn.Module,
    diffusion: Diffusion,
    encoder: Any,
    n: int,
    labels: torch.Tensor | None,
    latent_shape: tuple[int, int, int],
    num_classes: int,
    recipe: Recipe,
    device: torch.device,
    seed_key: tuple[int, ...],
) -> torch.Tensor:
    """``n`` images in [0, 1] for ``labels`` (None: unconditional), decoded by the encoder."""
    g = seeded_generator(*seed_key)
    noise = torch.randn((n, *latent_shape), generator=g)
    out = []
    bs = recipe.sample.batch_size
    for start in range(0, n, bs):
        x_T = noise[start : start + bs].to(device)
        y = labels[start : start + bs].to(device) if labels is not None else None
        eps = guided_eps(model, num_classes, y, recipe.sample.cfg_scale, recipe.train.precision,
                         recipe.sample.nag_scale)
        z = ddim_sample(
            eps, diffusion, x_T, num_steps=recipe.sample.num_steps, eta=recipe.sample.eta, generator=g
        )
        out.append(image_to_unit(encoder.decode(z)).cpu())
    return torch.cat(out)


def class_labels(n: int, num_classes: int) -> torch.Tensor | None:
    if num_classes == 0:
        return None
    return torch.arange(n) % num_classes


def save_png_atomic(grid_images: torch.Tensor, path: Path, nrow: int) -> None:
    """A PNG grid; images smaller than 32 pixels are enlarged (nearest) to be seen."""
    from torchvision.utils import save_image

    size = grid_images.shape[-1]
    if size < 32:
        grid_images = torch.nn.functional.interpolate(grid_images, scale_factor=-(-32 // size), mode="nearest")

    with atomic_file(path, suffix=".png") as tmp:
        save_image(grid_images, tmp, nrow=nrow, padding=1, pad_value=1.0)


def sample_grid(
    model, diffusion, encoder, latent_shape, num_classes, recipe, device, step: int
) -> tuple[torch.Tensor, int]:
    """A grid with one row per class (``sample.per_class`` columns), or 8x8 unconditional."""
    per = recipe.sample.per_class
    labels = torch.arange(min(num_classes, 32)).repeat_interleave(per) if num_classes else None
    n, nrow = (len(labels), per) if labels is not None else (64, 8)
    images = generate(
        model, diffusion, encoder, n, labels, latent_shape, num_classes, recipe, device,
        (recipe.seed, STREAM_SAMPLE),  # the same noises at every step: grids are comparable
    )
    return images, nrow


def _batches(images: torch.Tensor, size: int = 256) -> Iterator[torch.Tensor]:
    for start in range(0, len(images), size):
        yield images[start : start + size]


class EvaluationSuite:
    """The recipe's evaluators, prepared once against the reference images.

    The reference statistics and the optional baselines (real training images, a floor;
    pixel-shuffled ones, a ceiling) do not change during a run, so they are computed at the
    first evaluation and reused at every later one.
    """

    def __init__(self, recipe: Recipe, evaluators: list[Any], train_dataset: Any = None) -> None:
        self.recipe, self.evaluators, self.train_dataset = recipe, evaluators, train_dataset
        self._baselines: dict[str, float] | None = None

    def _prepare(self) -> dict[str, float]:
        r = self.recipe
        reference = image_to_unit(reference_images(r, r.eval.num_samples, r.seed))
        for evaluator in self.evaluators:
            evaluator.prepare(_batches(reference))
        baselines: dict[str, float] = {}
        if r.eval.baselines and self.train_dataset is not None:
            real = image_to_unit(dataset_images(self.train_dataset, r.eval.num_samples, r.seed + 1))
            g = seeded_generator(r.seed, 0, STREAM_EVAL)
            flat = real.flatten(1)
            perm = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
            shuffled = torch.gather(flat, 1, perm).view_as(real)
            for evaluator in self.evaluators:
                for label, images in (("train_images", real), ("shuffled_pixels", shuffled)):
                    for k, v in evaluator.evaluate(_batches(images)).items():
                        baselines[f"baseline_{label}/{k}"] = float(v)
        return baselines

    def evaluate(self, generated: torch.Tensor) -> dict[str, float]:
        if not self.evaluators:
            return {}
        if self._baselines is None:
            self._baselines = self._prepare()
        results: dict[str, float] = {}
        for evaluator in self.evaluators:
            results.update({k: float(v) for k, v in evaluator.evaluate(_batches(generated)).items()})
        return {**results, **self._baselines}


class HeldoutLoss:
    """The denoising loss on a fixed, paired held-out set: up to ``eval.loss_images``
    reference images (their latents and labels) x ``eval.loss_draws`` (t, noise) draws.

    The images and every draw come from fixed seeds that do not depend on the run, so every
    method, seed and step is scored on exactly the same (x0, y, t, noise): differences
    between runs carry no evaluation noise, unlike a sample-based metric. Draw ``d`` is
    ``t ~ U{0..T-1}`` and ``noise ~ N(0, I)`` for all images at once from the generator
    ``(HELDOUT_SEED, d, STREAM_HELDOUT)``, so the set does not depend on the batch size.
    """

    def __init__(self, recipe: Recipe, encoder: Any, num_classes: int, device: torch.device) -> None:
        e = recipe.eval
        images, labels = reference_items(recipe, e.loss_images, HELDOUT_SEED)
        self.x0 = torch.cat([encoder.encode(b.to(device)).float().cpu() for b in images.split(recipe.sample.batch_size)])
        self.y = labels if num_classes else None
        self.draws, self.batch_size, self.device = e.loss_draws, recipe.sample.batch_size, device

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, diffusion: Diffusion) -> float:
        n = len(self.x0)
        total = torch.zeros((), dtype=torch.float64)
        for d in range(self.draws):
            g = seeded_generator(HELDOUT_SEED, d, STREAM_HELDOUT)
            t = torch.randint(0, diffusion.num_timesteps, (n,), generator=g)
            noise = torch.randn(self.x0.shape, generator=g)
            for lo in range(0, n, self.batch_size):
                part = slice(lo, lo + self.batch_size)
                y = None if self.y is None else self.y[part].to(self.device)
                losses = diffusion.per_sample_loss(
                    model, self.x0[part].to(self.device), t[part].to(self.device), y, noise[part].to(self.device)
                )
                total += losses.double().sum().cpu()
        return float(total / (n * self.draws))


def update_metrics_file(path: Path, step: int, metrics: dict[str, float]) -> dict:
    """Append ``metrics`` at ``step`` to the metrics JSON (atomic rewrite)."""
    data: dict[str, Any] = {"history": []}
    if path.is_file():
        data = json.loads(path.read_text())
    history = [h for h in data.get("history", []) if h["step"] != step]
    history.append({"step": step, **metrics})
    history.sort(key=lambda h: h["step"])
    data = {"step": step, "metrics": metrics, "history": history}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    return data
