"""Noise raters ``phi_eta(eps, t, x0, y) -> score`` and loading a trained one.

Built-in raters are registered under the ``noisevalue.raters`` entry-point group:
``dual_stream`` (the paper's dual-stream DiT), ``dual_stream_tiny`` (CPU-sized, digits)
and ``norm`` (signed L2 norm, no parameters).
"""

from __future__ import annotations

from pathlib import Path

from noisevalue.interfaces import Rater
from noisevalue.raters.dual_stream import DualStreamRater, dual_stream, dual_stream_tiny
from noisevalue.raters.norm import NormRater

__all__ = ["DualStreamRater", "NormRater", "dual_stream", "dual_stream_tiny", "load_rater"]

RATER_GROUP = "rater"  # tensor group (``rater.safetensors``)


def load_rater(path: str | Path) -> tuple[Rater, Path]:
    """Rebuild a rater from a checkpoint folder (or a run / checkpoints folder, whose
    newest checkpoint is used) and load its weights. Returns ``(rater, checkpoint_dir)``.

    The folder holds ``rater.safetensors`` and ``meta.json`` whose ``rater`` entry names
    the registry name and constructor params. The rater is returned in
    eval mode with ``requires_grad`` off. Problems raise ``CheckpointError``.
    """
    from noisevalue import checkpoint, registry
    from noisevalue.errors import CheckpointError

    ckpt = checkpoint.resolve_checkpoint(path)
    identity = checkpoint.read_meta(ckpt).rater
    if identity is None:
        raise CheckpointError(
            f"checkpoint '{ckpt}' is not a rater checkpoint: {checkpoint.META} has no '{RATER_GROUP}' entry"
        )
    rater = registry.create("rater", identity.name, **identity.params)
    state = checkpoint.load_tensors(ckpt, RATER_GROUP)
    checkpoint.load_state_into(rater, state, f"rater checkpoint '{ckpt}'")
    rater.eval()
    rater.requires_grad_(False)
    return rater, ckpt
