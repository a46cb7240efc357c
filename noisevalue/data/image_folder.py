"""Images read from a folder, ImageNet style, with the ADM centre crop.

Two layouts are supported:

* ``class_conditional=True``: one subfolder per class (``root/<class>/**/<image>``);
  labels are the indices of the sorted subfolder names, as in ImageNet's ``train``.
* ``class_conditional=False``: every image below ``root`` (searched recursively),
  unconditional (``num_classes == 0``, label 0).

Every image is converted to RGB and centre-cropped with the procedure of ADM
(guided-diffusion) that DiT also uses, see :func:`adm_center_crop`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from noisevalue.errors import ConfigError, DataError
from noisevalue.interfaces import ImageDataset

__all__ = ["ImageFolderDataset", "adm_center_crop", "DEFAULT_EXTENSIONS"]

DEFAULT_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def adm_center_crop(image: Image.Image, image_size: int) -> Image.Image:
    """Square ``image_size`` crop of ``image`` by the ADM rule (``center_crop_arr``).

    1. While the shorter side is at least ``2 * image_size``, halve both sides (integer
       division) with BOX filtering: cheap anti-aliasing for large images.
    2. Resize with BICUBIC filtering so that the shorter side is exactly ``image_size``
       (the longer side is rounded to the nearest integer).
    3. Cut the central ``image_size x image_size`` square (offsets rounded down).
    """
    while min(image.size) >= 2 * image_size:
        half = (image.width // 2, image.height // 2)
        image = image.resize(half, resample=Image.Resampling.BOX)
    scale = image_size / min(image.size)
    target = (round(image.width * scale), round(image.height * scale))
    if target != image.size:
        image = image.resize(target, resample=Image.Resampling.BICUBIC)
    left = (image.width - image_size) // 2
    top = (image.height - image_size) // 2
    return image.crop((left, top, left + image_size, top + image_size))


def _normalise_extensions(extensions: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(extensions, str):
        extensions = [extensions]
    out = []
    for ext in extensions:
        if not isinstance(ext, str) or not ext.strip("."):
            raise ConfigError(f"params.extensions: expected file suffixes; got {ext!r}")
        out.append("." + ext.lower().lstrip("."))
    if not out:
        raise ConfigError("params.extensions: expected at least one file suffix")
    return tuple(out)


def _find_images(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """Image files below ``folder`` (recursive, hidden entries skipped), sorted."""
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in filenames:
            if not name.startswith(".") and os.path.splitext(name)[1].lower() in extensions:
                found.append(Path(dirpath) / name)
    return sorted(found)


class ImageFolderDataset(ImageDataset):
    """RGB images from ``root`` as ``[3, image_size, image_size]`` tensors in ``[-1, 1]``.

    Args:
        root: the data folder (see the module docstring for the two layouts).
        image_size: side length of the ADM centre crop.
        class_conditional: one subfolder per class, or one unconditional pool of images.
        random_flip: flip each returned image horizontally with probability 0.5, drawn
            from torch's global RNG (seed it with ``torch.manual_seed``; DataLoader
            workers get distinct seeds). A latent cache disables it while encoding.
        extensions: accepted file suffixes (case-insensitive).

    Attributes: ``classes`` (sorted class names; empty when unconditional), ``samples``
    (``(path, label)`` pairs in a fixed order) and ``paths``.
    """

    channels = 3

    def __init__(
        self,
        root: str,
        image_size: int = 256,
        class_conditional: bool = True,
        random_flip: bool = True,
        extensions: Sequence[str] = DEFAULT_EXTENSIONS,
    ) -> None:
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
            raise ConfigError(
                f"params.image_size: expected a positive integer; got {image_size!r}"
            )
        self.root = Path(os.path.expanduser(str(root)))
        self.image_size = int(image_size)
        self.class_conditional = bool(class_conditional)
        self.random_flip = bool(random_flip)
        self.extensions = _normalise_extensions(extensions)
        if not self.root.is_dir():
            raise DataError(f"params.root: folder '{self.root}' does not exist")

        if self.class_conditional:
            self.classes, self.samples = self._scan_classes()
        else:
            self.classes = []
            self.samples = [(p, 0) for p in _find_images(self.root, self.extensions)]
            if not self.samples:
                raise DataError(self._no_images(self.root))
        self.num_classes = len(self.classes)

    def _no_images(self, folder: Path) -> str:
        return f"params.root: no images ({', '.join(self.extensions)}) found in '{folder}'"

    def _scan_classes(self) -> tuple[list[str], list[tuple[Path, int]]]:
        classes = sorted(
            entry.name
            for entry in os.scandir(self.root)
            if entry.is_dir() and not entry.name.startswith(".")
        )
        if not classes:
            if not _find_images(self.root, self.extensions):
                raise DataError(self._no_images(self.root))
            raise DataError(
                f"params.root: expected one subfolder per class in '{self.root}' "
                "but found images directly in it; "
                "arrange the images as root/<class>/<image> or set "
                "params.class_conditional=false for unconditional data"
            )
        samples: list[tuple[Path, int]] = []
        empty = []
        for label, name in enumerate(classes):
            files = _find_images(self.root / name, self.extensions)
            if not files:
                empty.append(name)
            samples.extend((p, label) for p in files)
        if not samples:
            raise DataError(self._no_images(self.root))
        if empty:
            shown = ", ".join(empty[:5]) + (", ..." if len(empty) > 5 else "")
            raise DataError(
                f"params.root: {len(empty)} class folder(s) in '{self.root}' hold no "
                f"images ({', '.join(self.extensions)}): {shown}"
            )
        return classes, samples

    @property
    def paths(self) -> list[Path]:
        """The image files, in item order."""
        return [p for p, _ in self.samples]

    def __len__(self) -> int:
        return len(self.samples)

    def load_image(self, index: int) -> torch.Tensor:
        """Item ``index`` cropped and scaled to ``[-1, 1]``, never flipped."""
        path = self.samples[index][0]
        try:
            with Image.open(path) as img:
                image = img.convert("RGB")
        except OSError as exc:
            raise DataError(f"params.root: cannot read image '{path}': {exc}") from exc
        arr = np.asarray(adm_center_crop(image, self.image_size), dtype=np.uint8)
        x = torch.from_numpy(arr.copy()).permute(2, 0, 1).float()
        return x / 127.5 - 1.0

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.load_image(index)
        if self.random_flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return x, self.samples[index][1]

    def fingerprint(self) -> dict[str, Any]:
        """What identifies the content of this dataset (for on-disk caches).

        Covers the crop size, the classes and the relative paths of all items, but not
        ``random_flip`` (caches store unflipped images) nor where ``root`` lives.
        """
        digest = hashlib.sha256()
        for path, label in self.samples:
            digest.update(f"{path.relative_to(self.root).as_posix()}\t{label}\n".encode())
        return {
            "name": "image_folder",
            "image_size": self.image_size,
            "class_conditional": self.class_conditional,
            "num_classes": self.num_classes,
            "classes_sha256": hashlib.sha256("\n".join(self.classes).encode()).hexdigest(),
            "count": len(self),
            "files_sha256": digest.hexdigest(),
        }
