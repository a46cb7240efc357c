"""Built-in noise selectors: vanilla, the naive norm baselines, and a frozen rater.

Every selector picks one of ``k`` i.i.d. Gaussian candidates per training sample and runs
without an autograd graph (see :class:`noisevalue.interfaces.NoiseSelector`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import nn

from noisevalue.errors import CheckpointError, ConfigError
from noisevalue.interfaces import NoiseSelector, Rater

__all__ = [
    "RandomSelector",
    "MaxNormSelector",
    "MinNormSelector",
    "RaterSelector",
    "UntrainedRaterSelector",
]


def _check_k(name: str, k: int) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ConfigError(f"selector '{name}': k must be an integer >= 1, got {k!r}")
    return k


def _check_candidates(selector: NoiseSelector, x0: torch.Tensor, candidates: torch.Tensor) -> None:
    if candidates.ndim != 5 or candidates.shape[1] != selector.k:
        raise ValueError(
            f"{type(selector).__name__} (k={selector.k}) expects candidates [N, {selector.k}, "
            f"C, H, W], got {list(candidates.shape)}"
        )
    if candidates.shape[0] != x0.shape[0]:
        raise ValueError(
            f"{type(selector).__name__}: {candidates.shape[0]} candidate groups for "
            f"{x0.shape[0]} samples"
        )


def _norms(candidates: torch.Tensor) -> torch.Tensor:
    """L2 norm of each candidate, ``[N, k]``, in at least float32."""
    flat = candidates.flatten(2)
    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    return torch.linalg.vector_norm(flat, dim=2)


class RandomSelector(NoiseSelector):
    """Vanilla training: always candidate 0. The candidates are i.i.d., so the first is a
    fair draw; with ``k=1`` (the default) this is exactly vanilla training."""

    def __init__(self, k: int = 1):
        self.k = _check_k("random", k)

    @torch.no_grad()
    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        _check_candidates(self, x0, candidates)
        return torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)


class MaxNormSelector(NoiseSelector):
    """Naive baseline: the candidate with the largest L2 norm."""

    def __init__(self, k: int = 4):
        self.k = _check_k("max_norm", k)

    @torch.no_grad()
    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        _check_candidates(self, x0, candidates)
        return _norms(candidates).argmax(dim=1)


class MinNormSelector(NoiseSelector):
    """Naive baseline: the candidate with the smallest L2 norm."""

    def __init__(self, k: int = 4):
        self.k = _check_k("min_norm", k)

    @torch.no_grad()
    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        _check_candidates(self, x0, candidates)
        return _norms(candidates).argmin(dim=1)


class RaterSelector(NoiseSelector):
    """Top-1 of ``k`` candidates by a frozen rater (paper §4.3, stage iii).

    ``checkpoint``: a rater checkpoint folder (or a run folder; its newest checkpoint), as
    written by rater meta-training: ``rater.safetensors`` plus ``meta.json`` naming the
    registered rater and its constructor params. Alternatively ``rater``: an in-memory
    rater module (used as given: it is neither copied nor frozen, only run under
    ``no_grad``). ``batch_size`` caps how many candidates are scored per rater call.
    ``precision`` (``auto``: ``bf16`` on CUDA, ``fp32`` elsewhere) runs the rater under bf16
    autocast, where attention takes the fused flash kernel (no gradients are needed);
    ``compile`` (``auto``: on with CUDA) scores through ``torch.compile(mode="reduce-overhead")``,
    which adds CUDA graphs.
    In the protocol, ``ablate`` and ``transfer`` a missing ``checkpoint`` is filled with
    the rater meta-trained for the run's seed (``needs_rater = "trained"``).
    """

    needs_rater: ClassVar[Literal["trained", "untrained"] | None] = "trained"

    def __init__(
        self,
        k: int = 4,
        checkpoint: str | Path | None = None,
        rater: Rater | nn.Module | None = None,
        batch_size: int | None = None,
        precision: str = "auto",
        compile: bool | str = "auto",
    ):
        self.k = _check_k("rater", k)
        if precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"selector 'rater': precision must be auto, fp32 or bf16, got {precision!r}")
        if compile not in ("auto", True, False):
            raise ConfigError(f"selector 'rater': compile must be auto, true or false, got {compile!r}")
        self.precision, self.compile = precision, compile
        self._compiled: Any = None
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ConfigError(
                f"selector 'rater': batch_size must be an integer >= 1 or null, got {batch_size!r}"
            )
        self.batch_size = batch_size
        if rater is not None and checkpoint is not None:
            raise ConfigError(
                "selector 'rater': give either params.checkpoint or a rater, not both"
            )
        if rater is None:
            if checkpoint is None or str(checkpoint) == "":
                raise ConfigError(
                    "selector 'rater' needs params.checkpoint (a rater checkpoint folder)"
                )
            from noisevalue.raters import load_rater

            rater, resolved = load_rater(checkpoint)
            self.source = f"rater checkpoint '{resolved}'"
        else:
            self.source = f"rater {type(rater).__name__}"
        self.rater = rater

    def check_compatible(self, latent_shape: tuple[int, ...], num_classes: int) -> None:
        """Raise ``CheckpointError`` if the rater was built for other latents or classes.

        A rater that does not read labels (``uses_labels`` False, or ``num_classes`` None)
        fits any class count; one with ``latent_shape`` None fits any latent shape."""
        r_shape = getattr(self.rater, "latent_shape", None)
        r_classes = getattr(self.rater, "num_classes", None)
        shape_ok = r_shape is None or tuple(r_shape) == tuple(latent_shape)
        reads_labels = r_classes is not None and getattr(self.rater, "uses_labels", True)
        classes_ok = not reads_labels or r_classes == num_classes
        if not (shape_ok and classes_ok):
            trained = tuple(r_shape) if r_shape is not None else "any shape"
            raise CheckpointError(
                f"{self.source} was trained for latents {trained} and {r_classes} classes, "
                f"but the backbone uses {tuple(latent_shape)} and {num_classes} classes"
            )

    @torch.no_grad()
    def scores(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor
    ) -> torch.Tensor:
        """Rater scores of every candidate, ``[N, k]``, in float32 (float64 for a float64 rater)."""
        _check_candidates(self, x0, candidates)
        n, k = candidates.shape[:2]
        param = next(iter(self.rater.parameters()), None)
        dtype = param.dtype if param is not None else candidates.dtype
        x0 = x0.to(dtype)
        if isinstance(self.rater, Rater) and self.rater.grouped:  # the k candidates of a sample at once
            rows, step, flat = n, max(1, (self.batch_size or n * k) // k), candidates.to(dtype)
            x0_rep, t_rep, y_rep = x0, t, y
        else:  # candidate j of sample i at row i * k + j, next to copies of its x0, y, t
            rows, step = n * k, self.batch_size or n * k
            flat = candidates.reshape(n * k, *candidates.shape[2:]).to(dtype)
            x0_rep, t_rep = x0.repeat_interleave(k, dim=0), t.repeat_interleave(k, dim=0)
            y_rep = y.repeat_interleave(k, dim=0) if y is not None else None
        cuda = candidates.device.type == "cuda"
        bf16 = self.precision == "bf16" or (self.precision == "auto" and cuda)
        rater = self._scorer(cuda)
        autocast = torch.autocast(candidates.device.type, dtype=torch.bfloat16, enabled=bf16)
        chunks = []
        for start in range(0, rows, step):
            part = slice(start, start + step)
            y_part = y_rep[part] if y_rep is not None else None
            with autocast:
                out = rater(flat[part], t_rep[part], x0_rep[part], y_part)
            # scores in at least float32, and always a copy of a compiled rater's output: its
            # CUDA graph writes the next call's scores into the same buffer
            chunks.append(out.to(torch.promote_types(out.dtype, torch.float32), copy=rater is not self.rater))
        return torch.cat(chunks).reshape(n, k)

    def _scorer(self, cuda: bool) -> Any:
        """The rater, or (``compile``) its compiled form, made once."""
        if not (self.compile is True or (self.compile == "auto" and cuda)):
            return self.rater
        if self._compiled is None:
            self._compiled = torch.compile(self.rater, mode="reduce-overhead" if cuda else "default", dynamic=False)
        return self._compiled

    @torch.no_grad()
    def select(
        self, x0: torch.Tensor, y: torch.Tensor | None, t: torch.Tensor, candidates: torch.Tensor,
        *, generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        if self.k == 1:  # nothing to choose: skip the rater
            _check_candidates(self, x0, candidates)
            return torch.zeros(candidates.shape[0], dtype=torch.long, device=candidates.device)
        return self.scores(x0, y, t, candidates).argmax(dim=1)

    def to(self, device: torch.device | str) -> RaterSelector:
        self.rater.to(device)
        return self


class UntrainedRaterSelector(RaterSelector):
    """Control: top-1 of ``k`` by the rater's *initial* weights (the same architecture and
    initialisation as the meta-trained rater, before any outer step). The protocol fills
    ``checkpoint`` with that untrained rater for the run's seed. Beside the trained rater
    it tells whether meta-training, not just scoring by some network, moves the result."""

    needs_rater = "untrained"
