"""What the trainer reads: batches of (x0, y) in the diffusion model's space.

Three sources, chosen from the recipe's dataset and encoder:

* in-memory tensors, for small datasets that expose ``images``/``labels`` (digits);
* an on-disk latent cache, for expensive encoders (the VAE), built once and shared by
  every rank and every later run with the same data and encoder;
* item-by-item reads of any ImageDataset, for pixel-space image folders.

Horizontal flips are decided by the trainer's seeded per-step draws, not inside the dataset,
so that resume and multi-process runs see the same augmentation.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from noisevalue import registry
from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import DataError


class TrainData:
    num_items: int
    num_classes: int
    latent_shape: tuple[int, int, int]

    def fetch(self, indices: torch.Tensor, flip: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class TensorData(TrainData):
    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int) -> None:
        self.images, self.labels = images, labels.long()
        self.num_items, self.num_classes = len(images), num_classes
        self.latent_shape = tuple(images.shape[1:])  # type: ignore[assignment]

    def fetch(self, indices, flip):
        x = self.images[indices]
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        return x, self.labels[indices]


class ItemData(TrainData):
    def __init__(self, dataset: Any, encoder: Any) -> None:
        self.dataset, self.encoder = dataset, encoder
        self.num_items, self.num_classes = len(dataset), dataset.num_classes
        self.latent_shape = tuple(encoder.latent_shape(dataset.channels, dataset.image_size))  # type: ignore[assignment]

    def fetch(self, indices, flip):
        items = [self.dataset[int(i)] for i in indices]
        x = torch.stack([img for img, _ in items])
        x = torch.where(flip.view(-1, 1, 1, 1), x.flip(-1), x)
        y = torch.tensor([lab for _, lab in items], dtype=torch.long)
        return self.encoder.encode(x), y


class CachedLatentData(TrainData):
    def __init__(self, cache: Any) -> None:
        self.cache = cache
        self.num_items, self.num_classes = len(cache), cache.num_classes
        self.latent_shape = (cache.channels, cache.image_size, cache.image_size)

    def fetch(self, indices, flip):
        return self.cache.get_batch(indices, flip_mask=flip)


def _fingerprint(recipe: Recipe) -> dict:
    return {
        "dataset": recipe.data.dataset.model_dump(),
        "encoder": recipe.data.encoder.model_dump(),
        "flips": recipe.data.random_flip,
    }


def fingerprint_id(fp: dict) -> str:
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:12]


def load_train_data(recipe: Recipe, run_dir: Path, info: DistInfo) -> tuple[TrainData, Any]:
    """(training data, encoder) for the recipe; builds the latent cache when needed."""
    dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    if len(dataset) == 0:
        raise DataError("data.dataset: the dataset is empty")
    encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    if encoder.cacheable:
        from noisevalue.data.latent_cache import (
            LatentCacheDataset,
            build_latent_cache,
            finalize_latent_cache,
        )

        cache_dir = Path(recipe.data.latent_cache or run_dir / "latents")
        fp = _fingerprint(recipe)
        build_latent_cache(
            dataset,
            encoder,
            cache_dir,
            batch_size=recipe.data.encode_batch_size,
            shard_size=recipe.data.cache_shard_size,
            rank=info.rank,
            world_size=info.world_size,
            fingerprint=fp,
            include_flips=recipe.data.random_flip,
            device=info.device,
            num_workers=recipe.data.num_workers,
        )
        barrier(info)
        if info.is_main:
            finalize_latent_cache(cache_dir)
        barrier(info)
        return CachedLatentData(LatentCacheDataset(cache_dir)), encoder
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        x = encoder.encode(dataset.images)
        return TensorData(x, dataset.labels, dataset.num_classes), encoder
    return ItemData(dataset, encoder), encoder


def reference_images(recipe: Recipe, limit: int, seed: int) -> torch.Tensor:
    """Images in [-1, 1] of the evaluation reference set (``data.eval_dataset``)."""
    return reference_items(recipe, limit, seed)[0]


def reference_items(recipe: Recipe, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels) of up to ``limit`` items of the evaluation reference set,
    a seeded random choice."""
    comp = recipe.data.eval_dataset or recipe.data.dataset
    where = "data.eval_dataset" if recipe.data.eval_dataset else "data.dataset"
    dataset = registry.build("dataset", comp, where=where)
    return dataset_items(dataset, limit, seed)


def dataset_images(dataset: Any, limit: int, seed: int) -> torch.Tensor:
    return dataset_items(dataset, limit, seed)[0]


def dataset_items(dataset: Any, limit: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(dataset)
    if n == 0:
        raise DataError("evaluation reference dataset is empty")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(n, generator=g)[: min(limit, n)]
    if hasattr(dataset, "images"):  # in memory (labels may be absent: pixels only)
        labels = getattr(dataset, "labels", None)
        y = torch.zeros(len(idx), dtype=torch.long) if labels is None else torch.as_tensor(labels)[idx].long()
        return dataset.images[idx], y
    items = [dataset[int(i)] for i in idx]
    return torch.stack([img for img, _ in items]), torch.tensor([lab for _, lab in items], dtype=torch.long)
