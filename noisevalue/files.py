"""Files: digests of their content, and paths as the user sees them."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["display_path", "file_digest", "state_digest"]


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes (hex)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def state_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 (hex) of a state dict's names and tensor bytes, in name order: the same
    weights give the same digest whatever file or format holds them."""
    import torch

    h = hashlib.sha256()
    for key, tensor in sorted(tensors.items()):
        h.update(key.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def display_path(path: str | Path) -> str:
    """``path`` for messages: relative to the working folder when inside it, else with
    the home folder written ``~``."""
    path = Path(path)
    if not path.is_absolute():
        return str(path)
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        pass
    try:
        return str(Path("~") / path.relative_to(Path.home()))
    except (ValueError, RuntimeError):
        return str(path)
