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
import os
import time
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


#: image readers per process while a GPU encodes the latent cache (``data.num_workers: auto``)
AUTO_READERS_PER_GPU = 8


def loader_workers(setting: int | str, device: torch.device | str, local_processes: int = 1,
                   cpus: int | None = None) -> int:
    """The data-loader workers of one process encoding the latent cache: ``setting`` when it
    is a number; for ``auto``, 0 on the CPU (the encoder competes with readers for the same
    cores) and on CUDA :data:`AUTO_READERS_PER_GPU`, at most this machine's ``cpus`` shared
    by its ``local_processes`` and at least 1."""
    if setting != "auto":
        return int(setting)
    if torch.device(device).type != "cuda":
        return 0
    share = int(cpus or 1) // max(1, int(local_processes))
    return max(1, min(AUTO_READERS_PER_GPU, share))


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cache_folder(recipe: Recipe, run_dir: str | Path) -> Path:
    """Where the recipe's latent cache is: ``data.latent_cache``, else ``<run_dir>/latents``."""
    return Path(recipe.data.latent_cache or Path(run_dir) / "latents")


def cache_arguments(recipe: Recipe) -> dict[str, Any]:
    """What identifies the latent cache and how it is sharded: the keyword arguments of
    :func:`~noisevalue.data.latent_cache.build_latent_cache` that the recipe sets."""
    return {
        "fingerprint": _fingerprint(recipe),
        "shard_size": recipe.data.cache_shard_size,
        "include_flips": recipe.data.random_flip,
        "dtype": recipe.data.cache_dtype,
    }


def build_cache(recipe: Recipe, run_dir: str | Path, info: DistInfo, dataset: Any = None, encoder: Any = None,
                say: Any = None) -> Path:
    """Encode this rank's shards of the training data into the recipe's latent cache
    (reused when complete, resumed when not), then, after a barrier, rank 0 checks and
    completes it; a collective: every rank calls it. ``say`` (rank 0): progress lines."""
    from noisevalue.data.latent_cache import build_latent_cache, finalize_latent_cache

    if dataset is None:
        dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    if encoder is None:
        encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    cache_dir = cache_folder(recipe, run_dir)
    encoder.to(info.device)  # the encoder runs where the run does (a GPU), not on the CPU
    workers = loader_workers(recipe.data.num_workers, info.device,
                             int(os.environ.get("LOCAL_WORLD_SIZE", "1")), _cpu_count())
    build_latent_cache(
        dataset, encoder, cache_dir, batch_size=recipe.data.encode_batch_size, rank=info.rank,
        world_size=info.world_size, device=info.device, num_workers=workers,
        progress=_progress(say) if say is not None and info.is_main else None, **cache_arguments(recipe),
    )
    barrier(info)
    if info.is_main:
        finalize_latent_cache(cache_dir)
    barrier(info)
    return cache_dir


def _progress(say: Any) -> Any:
    """A ``progress(done, total)`` that says every tenth of the way (and the end)."""
    start = time.perf_counter()
    said = [0]

    def progress(done: int, total: int) -> None:
        tenth = 10 * done // max(total, 1)
        if tenth > said[0]:
            said[0] = tenth
            elapsed = time.perf_counter() - start
            eta = elapsed * (total - done) / max(done, 1)
            say(f"encoding: {done}/{total} items of this process, {elapsed:.0f} s, eta {eta:.0f} s")

    return progress


def load_train_data(recipe: Recipe, run_dir: Path, info: DistInfo) -> tuple[TrainData, Any]:
    """(training data, encoder) for the recipe; builds the latent cache when needed."""
    dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    if len(dataset) == 0:
        raise DataError("data.dataset: the dataset is empty")
    encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    if encoder.cacheable:
        from noisevalue.data.latent_cache import LatentCacheDataset

        cache_dir = build_cache(recipe, run_dir, info, dataset, encoder)
        return CachedLatentData(LatentCacheDataset(cache_dir)), encoder
    if hasattr(dataset, "images") and hasattr(dataset, "labels"):
        x = encoder.encode(dataset.images)
        return TensorData(x, dataset.labels, dataset.num_classes), encoder
    return ItemData(dataset, encoder), encoder


def subset(n: int, count: int, seed: int) -> torch.Tensor:
    """The first ``count`` of a seeded permutation of ``n`` items (all of them if fewer)."""
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed))[: min(count, n)]


def read_items(dataset: Any, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(images in [-1, 1], labels) of ``indices`` of an image dataset (labels 0 when it has none)."""
    if hasattr(dataset, "images"):  # in memory (labels may be absent: pixels only)
        labels = getattr(dataset, "labels", None)
        y = torch.zeros(len(indices), dtype=torch.long) if labels is None else torch.as_tensor(labels)[indices].long()
        return dataset.images[indices], y
    items = [dataset[int(i)] for i in indices]
    return torch.stack([img for img, _ in items]), torch.tensor([lab for _, lab in items], dtype=torch.long)
