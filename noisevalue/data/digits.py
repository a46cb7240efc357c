"""scikit-learn's bundled 8x8 handwritten digits: a tiny, download-free image dataset.

1797 grey-scale images of the digits 0-9 with pixel values 0..16, shipped with
scikit-learn. Useful for smoke tests and for experiments that must run in seconds.

``jitter=True`` renders each image through its own small affine transform (rotation,
scale, sub-pixel shift), drawn once for each of the 1797 images from a fixed seed and
resampled bicubically from the native 8x8 pixels: the dataset stays fixed, but its images
no longer lie in the 64-dimensional span of the upsampled originals (a plain resize is
linear, so every resized image is a combination of 64 fixed images). The ``digits32``
recipe uses it at 32x32: 1,024 noise dimensions, against 64 at 8x8.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from noisevalue.errors import ConfigError
from noisevalue.interfaces import ImageDataset

__all__ = ["DigitsDataset", "SPLITS", "render"]

SPLITS = ("train", "test", "all")
NATIVE_SIZE = 8
NUM_IMAGES = 1797
# jitter=True: the largest rotation (degrees), relative change of scale and shift (native
# pixels, so sub-pixel at the native resolution), each drawn uniformly per image
JITTER_ROTATION = 10.0
JITTER_SCALE = 0.1
JITTER_SHIFT = 0.5
JITTER_SEED = 0


class DigitsDataset(ImageDataset):
    """The scikit-learn digits as ``[1, image_size, image_size]`` images in ``[-1, 1]``.

    Args:
        split: ``"train"``, ``"test"`` (the held-out part) or ``"all"``.
        holdout_fraction: fraction of each class held out as ``"test"``, in ``(0, 1)``.
        seed: seed of the stratified train/test split; the same seed always gives the
            same split, and ``"train"`` and ``"test"`` of one seed never overlap.
        image_size: side length; the native 8x8 images are resized bilinearly when it
            differs (e.g. 16 or 32 to allow larger patch sizes).
        jitter: render each image through its own fixed small affine transform (see the
            module docstring); the split rule is the same either way.

    Every image is held in memory: :attr:`images` float32 ``[N, 1, H, W]`` and
    :attr:`labels` long ``[N]`` can be indexed directly for fast batching.
    :attr:`indices` gives the positions of the items in the full 1797-image set.
    """

    num_classes = 10
    channels = 1

    def __init__(
        self,
        split: str = "train",
        holdout_fraction: float = 0.2,
        seed: int = 0,
        image_size: int = NATIVE_SIZE,
        jitter: bool = False,
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(
                f"params.split: expected one of {', '.join(SPLITS)}; got {split!r}"
            )
        if not isinstance(holdout_fraction, (int, float)) or not 0.0 < holdout_fraction < 1.0:
            raise ConfigError(
                f"params.holdout_fraction: expected a number in (0, 1); got {holdout_fraction!r}"
            )
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(
                f"params.image_size: expected a positive integer; got {image_size!r}"
            )
        if not isinstance(jitter, bool):
            raise ConfigError(f"params.jitter: expected true or false; got {jitter!r}")
        from sklearn.datasets import load_digits

        bunch = load_digits()
        data = np.asarray(bunch.data, dtype=np.float32)  # [1797, 64], values 0..16
        target = np.asarray(bunch.target, dtype=np.int64)

        self.split = split
        self.holdout_fraction = float(holdout_fraction)
        self.seed = int(seed)
        self.image_size = int(image_size)
        self.jitter = jitter
        self.indices = _split_indices(target, split, self.holdout_fraction, self.seed)

        images = torch.from_numpy(data[self.indices]).reshape(-1, 1, NATIVE_SIZE, NATIVE_SIZE)
        images = render(images / 16.0, self.indices, self.image_size, jitter)
        self.images = (images * 2.0 - 1.0).contiguous()  # [0, 1] -> [-1, 1]
        self.labels = torch.from_numpy(target[self.indices]).long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the content of this dataset (for on-disk caches)."""
        return {
            "name": "digits",
            "split": self.split,
            "holdout_fraction": self.holdout_fraction,
            "seed": self.seed,
            "image_size": self.image_size,
            **({"jitter": True} if self.jitter else {}),  # absent: the caches of plain digits stay valid
            "count": len(self),
        }


def render(images: torch.Tensor, indices: np.ndarray, image_size: int, jitter: bool) -> torch.Tensor:
    """Native images ``[n, 1, 8, 8]`` in ``[0, 1]`` (the items ``indices`` of the full set)
    as ``[n, 1, image_size, image_size]`` in ``[0, 1]``: unchanged, resized bilinearly, or,
    with ``jitter``, each through its own affine transform (bicubic, dark outside)."""
    if not jitter:
        if image_size == NATIVE_SIZE:
            return images
        return F.interpolate(
            images, size=(image_size, image_size), mode="bilinear", align_corners=False
        ).clamp_(0.0, 1.0)
    # one draw per image of the full set, so an image looks the same in every split
    draws = torch.rand(NUM_IMAGES, 4, generator=torch.Generator().manual_seed(JITTER_SEED), dtype=torch.float64)
    angle, scale, dx, dy = (draws[torch.as_tensor(indices, dtype=torch.long)] * 2 - 1).unbind(1)
    angle = torch.deg2rad(angle * JITTER_ROTATION)
    zoom = 1.0 / (1.0 + JITTER_SCALE * scale)  # output -> input coordinates
    shift = 2.0 * JITTER_SHIFT / NATIVE_SIZE  # native pixels -> grid units ([-1, 1] spans the image)
    theta = torch.stack([
        torch.stack([zoom * angle.cos(), -zoom * angle.sin(), shift * dx], 1),
        torch.stack([zoom * angle.sin(), zoom * angle.cos(), shift * dy], 1),
    ], 1)
    grid = F.affine_grid(theta, [len(images), 1, image_size, image_size], align_corners=False)
    out = F.grid_sample(
        images.double(), grid, mode="bicubic", padding_mode="zeros", align_corners=False
    )
    return out.clamp_(0.0, 1.0).float()


def _split_indices(
    target: np.ndarray, split: str, holdout_fraction: float, seed: int
) -> np.ndarray:
    """Sorted indices of ``split`` in a stratified train/test split seeded by ``seed``."""
    everything = np.arange(target.shape[0])
    if split == "all":
        return everything
    from sklearn.model_selection import train_test_split

    train, test = train_test_split(
        everything, test_size=holdout_fraction, stratify=target, random_state=seed, shuffle=True
    )
    return np.sort(train if split == "train" else test)
