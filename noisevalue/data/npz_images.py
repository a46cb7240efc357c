"""uint8 image arrays in ``.npz`` archives (the ADM evaluation suite's format), read in
batches straight from the archive, so a 50k-image file is never held in memory."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisevalue.errors import DataError

__all__ = ["NpzImages"]

_BATCH = 256  # images read per step


def _npy_header(fh: Any) -> tuple[tuple[int, ...], bool, np.dtype]:
    version = np.lib.format.read_magic(fh)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(fh)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(fh)
    raise ValueError(f"unsupported .npy format version {version}")


class NpzImages:
    """uint8 images ``[N, H, W, C]`` (C = 1 or 3) of an ``.npz`` member (``arr_0``), read in
    batches straight from the archive, so a 50k-image file is never held in memory."""

    def __init__(self, path: str | Path, what: str = "samples", key: str = "arr_0") -> None:
        self.path, self.key = Path(path), key
        expected = f"expected uint8 images [N, H, W, C] with C = 1 or 3 in '{key}'"
        if not self.path.is_file():
            raise DataError(f"{what} file '{self.path}' not found ({expected} of an .npz)")
        try:
            with zipfile.ZipFile(self.path) as zf:
                names = zf.namelist()
                if f"{key}.npy" not in names:
                    found = ", ".join(n[:-4] for n in names if n.endswith(".npy")) or "nothing"
                    raise DataError(f"{what} file '{self.path}' has no '{key}' (it holds {found}); {expected}")
                with zf.open(f"{key}.npy") as fh:
                    shape, fortran, dtype = _npy_header(fh)
        except (zipfile.BadZipFile, OSError, ValueError) as exc:
            raise DataError(f"{what} file '{self.path}' is not a readable .npz ({exc}); {expected}") from None
        if dtype != np.uint8 or len(shape) != 4 or shape[3] not in (1, 3) or fortran:
            raise DataError(
                f"{what} file '{self.path}': '{key}' is {dtype} of shape {tuple(shape)}; {expected}"
                + (" (values 0..255, as ADM's evaluation suite reads them)" if dtype != np.uint8 else "")
            )
        if shape[0] < 2:
            raise DataError(f"{what} file '{self.path}' holds {shape[0]} image(s); a Fréchet distance needs at least 2")
        self.shape: tuple[int, int, int, int] = tuple(int(s) for s in shape)  # type: ignore[assignment]

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def channels(self) -> int:
        return self.shape[3]

    def batches(self, size: int = _BATCH, limit: int | None = None, rank: int = 0,
                world: int = 1) -> Iterator[torch.Tensor]:
        """uint8 tensors ``[n, C, H, W]`` of the first ``limit`` images (all by default), in
        blocks of ``size``; block ``b`` only where ``b % world == rank`` (a process's share)."""
        n = len(self) if limit is None else min(limit, len(self))
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fh:
            _npy_header(fh)
            for block, start in enumerate(range(0, n, size)):
                count = min(size, n - start)
                if block % world != rank:
                    fh.seek(count * per_image, 1)
                    continue
                raw = fh.read(count * per_image)
                if len(raw) != count * per_image:
                    raise DataError(f"'{self.path}' is truncated: '{self.key}' ends before image {start + len(raw) // per_image}")
                array = np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2)
