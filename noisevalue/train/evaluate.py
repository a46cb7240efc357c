"""A run's evaluation, shared by all its processes: the sample grid, the held-out loss and
the evaluators' metrics, written to ``metrics.json``.

What an image is depends on its index only: image ``i`` starts from noise drawn by the
generator ``(seed, i, STREAM_SAMPLES)``, which also draws its DDIM noise (``eta > 0``), and
has class ``i % classes``: the very images ``noisevalue sample`` draws for the run's seed.
Every set (generated images, reference images, held-out items) is cut into blocks and
block ``b`` belongs to rank ``b % world_size``, so

* the union of the ranks' images is what one process draws, to the bit;
* no process holds more than a block of images at a time (memory does not grow with
  ``eval.num_samples``), and every process works on its share;
* an evaluator that :meth:`~noisevalue.interfaces.Evaluator.join`\\ s the process group sums
  its statistics over the ranks; any other is fed every image on rank 0, one block in
  flight at a time.

The reference statistics come from the one cache of :mod:`noisevalue.train.reference`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noisevalue.checkpoint import atomic_file, atomic_write_text
from noisevalue.config import Recipe
from noisevalue.diffusion import Diffusion, ddim_sample, ddpm_sample, guided_eps
from noisevalue.distributed import DistInfo, all_reduce_sum, gather_rows, stream_to_main
from noisevalue.interfaces import Evaluator
from noisevalue.train import metric_protocol as mp
from noisevalue.train.batches import (
    STREAM_EVAL,
    STREAM_GRID,
    STREAM_HELDOUT,
    STREAM_SAMPLES,
    image_generators,
    seeded_generator,
    to_device,
)
from noisevalue.train.build import image_to_unit
from noisevalue.train.data import read_items, subset
from noisevalue.train.reference import BLOCK, prepare_reference, run_reference

HELDOUT_LOSS = "heldout_loss"  # the primary metric of every comparison table
HELDOUT_SEED = 0  # not the run's seed: every run, method and seed scores the same set
HELDOUT_BLOCK = 64  # held-out items per block (each block's draws from its own generator)
GRID_UNCONDITIONAL = 64  # images of an unconditional run's grid (8 x 8)


def blocks(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, stop)`` of the blocks of ``size`` that cover ``0..n-1``."""
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def share(n: int, size: int, info: DistInfo) -> list[tuple[int, int]]:
    """This rank's blocks: block ``b`` belongs to rank ``b % world_size``."""
    return blocks(n, size)[info.rank :: info.world_size]


def owners(n: int, size: int, info: DistInfo) -> list[int]:
    """The rank that draws each block, in block order."""
    return [b % info.world_size for b in range(len(blocks(n, size)))]


@dataclass(frozen=True)
class Sampling:
    """What decides a sampled image besides its weights, index and seed."""

    num_steps: int
    eta: float
    cfg_scale: float
    precision: str = "fp32"  # bf16: the model under bf16 autocast
    nag_scale: float = 0.0
    sampler: str = "ddim"  # or ddpm (with the learned variance when the model has one)

    @classmethod
    def of(cls, recipe: Recipe) -> Sampling:
        s = recipe.sample
        return cls(s.num_steps, s.eta, s.cfg_scale, str(recipe.train.precision), s.nag_scale, s.sampler)


@torch.no_grad()
def draw_images(
    model: torch.nn.Module, diffusion: Diffusion, encoder: Any, latent_shape: tuple[int, ...], num_classes: int,
    labels: torch.Tensor | None, generators: list[torch.Generator], sampling: Sampling, device: torch.device,
) -> torch.Tensor:
    """Images in [0, 1] (on the CPU), one per generator: its starting noise and its DDIM
    noise come from it, so an image does not depend on the batch it is drawn in."""
    noise = torch.cat([torch.randn((1, *latent_shape), generator=g) for g in generators])
    y = to_device(labels, device) if labels is not None else None
    learned = sampling.sampler == "ddpm" and bool(getattr(model, "learn_sigma", False))
    eps = guided_eps(model, num_classes, y, sampling.cfg_scale, sampling.precision, sampling.nag_scale,
                     variance=learned)
    # a list of generators: diffusers draws each image's sampler noise from its own one
    if sampling.sampler == "ddpm":
        z = ddpm_sample(eps, diffusion, to_device(noise, device), num_steps=sampling.num_steps,
                        learned_variance=learned, generator=generators)
    else:
        z = ddim_sample(eps, diffusion, to_device(noise, device), num_steps=sampling.num_steps, eta=sampling.eta,
                        generator=generators)  # type: ignore[arg-type]
    return image_to_unit(encoder.decode(z)).cpu()


def to_uint8(unit: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1] as the uint8 values a saved sample holds (clamped, rounded)."""
    return (unit.float().clamp(0, 1) * 255).round().to(torch.uint8)


def class_labels(start: int, stop: int, num_classes: int) -> torch.Tensor | None:
    """Image ``i``'s class, ``i % num_classes`` (None: unconditional)."""
    return torch.arange(start, stop) % num_classes if num_classes else None


def grid_labels(num_classes: int, per_class: int) -> tuple[torch.Tensor | None, int, int]:
    """(labels, images, columns) of a sample grid: one row per class (up to 32 classes),
    ``per_class`` columns, or 8 x 8 unconditional images."""
    if not num_classes:
        return None, GRID_UNCONDITIONAL, 8
    labels = torch.arange(min(num_classes, 32)).repeat_interleave(per_class)
    return labels, len(labels), per_class


def save_png_atomic(grid_images: torch.Tensor, path: Path, nrow: int) -> None:
    """A PNG grid; images smaller than 32 pixels are enlarged (nearest) to be seen."""
    from torchvision.utils import save_image

    size = grid_images.shape[-1]
    if size < 32:
        grid_images = torch.nn.functional.interpolate(grid_images, scale_factor=-(-32 // size), mode="nearest")

    with atomic_file(path, suffix=".png") as tmp:
        save_image(grid_images, tmp, nrow=nrow, padding=1, pad_value=1.0)


class Evaluation:
    """The evaluation of a run's (EMA) model, on every process of the run.

    Built once per run: the held-out items are read and encoded (this rank's share), the
    evaluators told about the process group; the reference statistics are prepared at the
    first evaluation (from the cache when they are there) and the baselines computed once.
    """

    def __init__(
        self, recipe: Recipe, evaluators: list[Any], info: DistInfo, encoder: Any, latent_shape: tuple[int, ...],
        num_classes: int, diffusion: Diffusion, train_dataset: Any = None,
    ) -> None:
        self.recipe, self.evaluators, self.info = recipe, evaluators, info
        self.encoder, self.latent_shape, self.num_classes, self.diffusion = encoder, latent_shape, num_classes, diffusion
        self.joined = [info.distributed and isinstance(e, Evaluator) and bool(e.join(info)) for e in evaluators]
        self.train_dataset = train_dataset if recipe.eval.baselines else None
        self.reference = run_reference(recipe)
        self.heldout = (HeldoutLoss(recipe, self.reference.dataset(), encoder, num_classes, info)
                        if recipe.eval.loss_draws else None)
        self.sampling = Sampling.of(recipe)
        self._baselines: dict[str, float] | None = None
        self.protocols: dict[str, dict[str, Any]] = {}  # metric -> its protocol (rank 0, after metrics())
        self._evaluator_protocols: dict[int, dict[str, Any]] = {}

    # ------------------------------------------------------------------ images
    def _draw(self, model: torch.nn.Module, parts: list[tuple[int, int]], stream: int,
              labels: Any) -> Iterator[torch.Tensor]:
        for lo, hi in parts:
            yield draw_images(model, self.diffusion, self.encoder, self.latent_shape, self.num_classes, labels(lo, hi),
                              image_generators(self.recipe.seed, lo, hi, stream), self.sampling, self.info.device)

    def grid(self, model: torch.nn.Module) -> tuple[torch.Tensor | None, int]:
        """The sample grid (the same noises at every step, so grids are comparable), drawn
        by all ranks; (images in [0, 1], columns) on rank 0, (None, columns) elsewhere."""
        labels, n, nrow = grid_labels(self.num_classes, self.recipe.sample.per_class)
        parts = share(n, self.recipe.sample.batch_size, self.info)
        pick = (lambda lo, hi: labels[lo:hi]) if labels is not None else (lambda lo, hi: None)
        images = [to_uint8(image) for image in self._draw(model, parts, STREAM_GRID, pick)]
        index = torch.cat([torch.arange(lo, hi) for lo, hi in parts]) if parts else torch.zeros(0, dtype=torch.long)
        mine = torch.cat(images) if images else torch.zeros((0, *self._image_shape()), dtype=torch.uint8)
        dev = self.info.device
        rows, order = gather_rows(mine.to(dev), self.info), gather_rows(index.to(dev), self.info)
        if rows is None or order is None:
            return None, nrow
        return rows.cpu()[torch.argsort(order.cpu())].float() / 255, nrow

    def _image_shape(self) -> tuple[int, ...]:
        probe = self.encoder.decode(torch.zeros((1, *self.latent_shape), device=self.info.device))
        return tuple(probe.shape[1:])

    def generated(self, model: torch.nn.Module) -> Iterator[torch.Tensor]:
        """This rank's share of the ``eval.num_samples`` images, block by block, as saved
        samples are (uint8 values): what `noisevalue eval` scores from `noisevalue sample`."""
        parts = share(self.recipe.eval.num_samples, self.recipe.sample.batch_size, self.info)
        for images in self._draw(model, parts, STREAM_SAMPLES, lambda lo, hi: class_labels(lo, hi, self.num_classes)):
            yield to_uint8(images).float() / 255

    # ------------------------------------------------------------------ metrics
    def metrics(self, model: torch.nn.Module) -> dict[str, float]:
        """The held-out loss and every evaluator's metrics (with the baselines); complete on
        rank 0."""
        out: dict[str, float] = {}
        if self.heldout is not None:
            out[HELDOUT_LOSS] = self.heldout(model, self.diffusion)
            self.protocols[HELDOUT_LOSS] = self.heldout.protocol()
        if not self.evaluators:
            return out
        first = self._baselines is None
        if first:
            self._prepare()
        n, size = self.recipe.eval.num_samples, self.recipe.sample.batch_size
        for i, (evaluator, joined) in enumerate(zip(self.evaluators, self.joined, strict=True)):
            scored = self._score(evaluator, joined, lambda: self.generated(model), owners(n, size, self.info))
            out.update(scored)
            if scored:  # the same at every evaluation of the run: worked out once
                if i not in self._evaluator_protocols:
                    self._evaluator_protocols[i] = self._protocol(i)
                self.protocols.update(dict.fromkeys(scored, self._evaluator_protocols[i]))
        if first:
            self._baselines = self._baseline_metrics()
        return {**out, **(self._baselines or {})}

    def _score(self, evaluator: Any, joined: bool, images: Any, block_owners: list[int]) -> dict[str, float]:
        """``evaluator`` on the images ``images()`` yields on each rank (blocks owned as
        ``block_owners`` says): every rank its share when joined, else all on rank 0."""
        info = self.info
        if joined or not info.distributed:
            return {k: float(v) for k, v in evaluator.evaluate(images()).items()}
        stream = stream_to_main(block_owners, images(), info)
        if not info.is_main:
            for _ in stream:  # sends this rank's blocks
                pass
            return {}
        return {k: float(v) for k, v in evaluator.evaluate(stream).items()}

    def _protocol(self, i: int) -> dict[str, Any]:
        """The protocol of evaluator ``i``'s metrics: the run's sampling, the evaluator's
        features and code, the reference."""
        r, evaluator = self.recipe, self.evaluators[i]
        s = r.sample
        sampled = mp.sampling(s.num_steps, s.eta, s.cfg_scale, s.nag_scale, r.eval.num_samples, s.use_ema, s.sampler)
        stats = getattr(evaluator, "reference_stats", None)  # a statistics file of its own is its reference
        reference = mp.reference_identity(str(stats) if stats else self.reference.label, self.reference, evaluator)
        return mp.sample_metric(sampled, evaluator, r.eval.evaluators[i].name, reference)

    def _prepare(self) -> None:
        for evaluator, joined in zip(self.evaluators, self.joined, strict=True):
            prepare_reference(evaluator, self.reference, info=self.info, joined=joined)

    def _baseline_metrics(self) -> dict[str, float]:
        """Real training images (a floor) and pixel-shuffled ones (a ceiling), scored once."""
        data = self.train_dataset
        if data is None:
            return {}
        r, info = self.recipe, self.info
        chosen = subset(len(data), r.eval.num_samples, r.seed + 1)
        size = BLOCK  # not the batch size: the shuffles are drawn per block
        parts = share(len(chosen), size, info)
        block_owners = owners(len(chosen), size, info)

        def real() -> Iterator[torch.Tensor]:
            for lo, hi in parts:
                yield image_to_unit(read_items(data, chosen[lo:hi])[0])

        def shuffled() -> Iterator[torch.Tensor]:
            for (lo, _), images in zip(parts, real(), strict=True):
                g = seeded_generator(r.seed, lo // size, STREAM_EVAL)
                flat = images.flatten(1)
                perm = torch.argsort(torch.rand(flat.shape, generator=g), dim=1)
                yield torch.gather(flat, 1, perm).view_as(images)

        out: dict[str, float] = {}
        for evaluator, joined in zip(self.evaluators, self.joined, strict=True):
            for label, images in (("train_images", real), ("shuffled_pixels", shuffled)):
                for k, v in self._score(evaluator, joined, images, block_owners).items():
                    out[f"baseline_{label}/{k}"] = v
        return out


class HeldoutLoss:
    """The denoising loss on a fixed, paired held-out set: up to ``eval.loss_images`` images
    of the reference ``dataset`` (their latents and labels) x ``eval.loss_draws`` (t, noise)
    draws.

    The images and every draw come from fixed seeds that do not depend on the run, so every
    method, seed and step is scored on exactly the same (x0, y, t, noise): differences
    between runs carry no evaluation noise, unlike a sample-based metric. The items are cut
    into blocks of :data:`HELDOUT_BLOCK`; draw ``d`` of block ``b`` is ``t ~ U{0..T-1}`` and
    ``noise ~ N(0, I)`` from the generator ``(HELDOUT_SEED, d, STREAM_HELDOUT, b)``, so the
    set depends neither on the batch size nor on the number of processes, each of which
    scores its own blocks (the float64 sums are added over the processes).
    """

    def __init__(self, recipe: Recipe, dataset: Any, encoder: Any, num_classes: int, info: DistInfo) -> None:
        e = recipe.eval
        chosen = subset(len(dataset), e.loss_images, HELDOUT_SEED)
        self.n, self.draws, self.info = len(chosen), e.loss_draws, info
        comp = recipe.data.eval_dataset or recipe.data.dataset
        self.identity = {"kind": "heldout_loss", "images": self.n, "draws": self.draws, "seed": HELDOUT_SEED,
                         "dataset": comp.model_dump(mode="json"), "encoder": recipe.data.encoder.model_dump(mode="json"),
                         "evaluator": {"name": "heldout_loss", "distribution": "noisevalue",
                                       "version": mp.version("noisevalue")}}
        self.batch_size = recipe.sample.batch_size
        self.blocks: list[tuple[int, torch.Tensor, torch.Tensor | None]] = []  # (block, x0, y) of this rank
        for b, part in enumerate(chosen.split(HELDOUT_BLOCK)):
            if b % info.world_size != info.rank:
                continue
            images, labels = read_items(dataset, part)
            x0 = torch.cat([encoder.encode(to_device(chunk, info.device)).float().cpu()
                            for chunk in images.split(self.batch_size)])
            self.blocks.append((b, x0, labels if num_classes else None))

    def protocol(self) -> dict[str, Any]:
        """What the loss is computed on: the held-out images and draws, the encoder, the code."""
        return self.identity

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, diffusion: Diffusion) -> float:
        dev = self.info.device
        total = torch.zeros((), dtype=torch.float64, device=dev)
        pending: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]] = []

        def flush() -> None:
            nonlocal total
            x0, t, noise = (torch.cat([p[i] for p in pending]) for i in range(3))  # type: ignore[misc]
            y = torch.cat([p[3] for p in pending]) if pending[0][3] is not None else None  # type: ignore[misc]
            losses = diffusion.per_sample_loss(model, to_device(x0, dev), to_device(t, dev),
                                               to_device(y, dev) if y is not None else None, to_device(noise, dev))
            total = total + losses.double().sum()
            pending.clear()

        for d in range(self.draws):
            for b, x0, y in self.blocks:
                g = seeded_generator(HELDOUT_SEED, d, STREAM_HELDOUT, b)
                t = torch.randint(0, diffusion.num_timesteps, (len(x0),), generator=g)
                noise = torch.randn(x0.shape, generator=g)
                pending.append((x0, t, noise, y))
                if sum(len(p[0]) for p in pending) >= self.batch_size:
                    flush()
        if pending:
            flush()
        return float(all_reduce_sum(total, self.info)) / (self.n * self.draws)


def update_metrics_file(path: Path, step: int, metrics: dict[str, float],
                        protocols: dict[str, dict[str, Any]] | None = None) -> dict:
    """Append ``metrics`` at ``step`` to the metrics JSON (atomic rewrite). ``protocols``:
    metric -> how it was computed (:mod:`.metric_protocol`), kept once per digest under
    ``protocols``; the row names each metric's digest under ``protocol``."""
    data: dict[str, Any] = {"history": []}
    if path.is_file():
        data = json.loads(path.read_text())
    history = [h for h in data.get("history", []) if h["step"] != step]
    known = dict(data.get("protocols", {}))
    row: dict[str, Any] = {"step": step, **metrics}
    if protocols:
        named = {metric: mp.digest(p) for metric, p in protocols.items() if metric in metrics}
        known.update({named[metric]: protocols[metric] for metric in named})
        row[mp.ROW_KEY] = named
    history.append(row)
    history.sort(key=lambda h: h["step"])
    data = {"step": step, "metrics": metrics, "history": history, **({"protocols": known} if known else {})}
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True))
    return data
