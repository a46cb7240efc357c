"""What generated images are compared with, and the one cache of its statistics.

A :class:`Reference` is a set of images: precomputed statistics (an ``.npz`` with ``mu``
and ``sigma``, the ADM format), a reference batch (an ``.npz`` with ``arr_0``), an image
folder, the held-out digits, or ``count`` items of a dataset component chosen by a fixed
seed (what a training run scores against: :func:`run_reference`). Its images are read in
blocks; a process reads its own share of the blocks only.

:func:`prepare_reference` gives an evaluator its reference: the statistics from a stats file
or from the cache, else from the images (then cached). The cache is keyed by the reference
(its files, or the dataset's content fingerprint, count and seed) and the evaluator's
``reference_key()`` (feature space and a digest of the weights), so training evaluations,
every later stage, ``compare``, ``ablate``, ``transfer`` and ``noisevalue eval`` compute a
reference once and reuse it. Only rank 0 touches the cache; on a miss every process that
shares the evaluation (:meth:`~noisevalue.interfaces.Evaluator.join`) reads its share.
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisevalue import registry
from noisevalue.checkpoint import atomic_write_text
from noisevalue.config import Component, Recipe
from noisevalue.distributed import DistInfo, all_reduce_sum, broadcast_object
from noisevalue.errors import ConfigError, DataError, UserError
from noisevalue.files import display_path
from noisevalue.train.build import image_to_unit
from noisevalue.train.data import read_items, subset

__all__ = [
    "BLOCK",
    "DIGITS_REFERENCE",
    "REFERENCE_SEED",
    "Reference",
    "default_stats_cache",
    "parse_reference",
    "prepare_reference",
    "reference_key",
    "run_reference",
]

DIGITS_REFERENCE = "digits"
BLOCK = 256  # reference images read per step (and per process share)
#: the seed that picks a run's reference items: the same for every run, seed and stage
REFERENCE_SEED = 0
SINGLE = DistInfo()


@dataclass
class Reference:
    """What the samples are compared with.

    ``kind``: ``stats`` (an .npz with mu/sigma), ``npz`` (an .npz with arr_0 images),
    ``folder`` (image files), ``digits`` (the held-out digits) or ``dataset`` (a recipe's
    dataset component: ``count`` of its items chosen by ``seed``, all when ``count`` is
    None)."""

    kind: str
    label: str
    path: Path | None = None
    component: Component | None = None
    has_images: bool = False  # a stats .npz that also holds arr_0 (ADM reference batches)
    count: int | None = None
    seed: int = REFERENCE_SEED
    where: str = "data.eval_dataset"  # the recipe key of ``component``, for messages
    _dataset: Any = field(default=None, repr=False, compare=False)

    def blocks(self, rank: int = 0, world: int = 1) -> Iterator[torch.Tensor]:
        """Float images in [0, 1], in blocks of :data:`BLOCK`; block ``b`` only where
        ``b % world == rank``."""
        if self.kind in ("npz", "stats"):
            from noisevalue.data.npz_images import NpzImages

            for batch in NpzImages(self.path, "reference").batches(BLOCK, rank=rank, world=world):  # type: ignore[arg-type]
                yield batch.float() / 255
        elif self.kind == "folder":
            files = _folder_files(self.path)  # type: ignore[arg-type]
            for b, start in enumerate(range(0, len(files), BLOCK)):
                if b % world == rank:
                    yield _read_files(files[start : start + BLOCK]).float() / 255
        elif self.kind == "digits":
            from noisevalue.evaluators.digit_features import digits_split

            images, _ = digits_split("test")
            yield from list(images.split(BLOCK))[rank::world]
        else:
            dataset = self.dataset()
            chosen = subset(len(dataset), self.count if self.count is not None else len(dataset), self.seed)
            if len(chosen) < 2:
                raise DataError(f"reference dataset {self.label}: {len(chosen)} image(s); a Fréchet distance needs at least 2")
            for part in list(chosen.split(BLOCK))[rank::world]:
                yield image_to_unit(read_items(dataset, part)[0])

    def dataset(self) -> Any:
        """The dataset component, built once (an image folder scans its files to build)."""
        assert self.component is not None
        if self._dataset is None:
            self._dataset = registry.build("dataset", self.component, where=self.where)
        return self._dataset


def run_reference(recipe: Recipe) -> Reference:
    """The reference a run's evaluations score against: ``eval.num_samples`` items of
    ``data.eval_dataset`` (else ``data.dataset``) chosen by :data:`REFERENCE_SEED`."""
    comp = recipe.data.eval_dataset or recipe.data.dataset
    where = "data.eval_dataset" if recipe.data.eval_dataset else "data.dataset"
    return Reference("dataset", f"{where} ({comp.name})", component=comp, count=recipe.eval.num_samples, where=where)


def parse_reference(reference: str | Path | Component | Reference) -> Reference:
    if isinstance(reference, Reference):
        return reference
    if isinstance(reference, Component):
        return Reference("dataset", f"dataset {reference.name} {json.dumps(reference.params, sort_keys=True)}",
                         component=reference)
    text = str(reference)
    path = Path(text).expanduser()
    if text == DIGITS_REFERENCE and not path.exists():
        return Reference("digits", DIGITS_REFERENCE)
    if path.is_dir():
        return Reference("folder", text, path)
    if not path.is_file():
        raise DataError(
            f"reference '{text}' not found: expected an .npz (mu and sigma, or arr_0 images), "
            f"an image folder or '{DIGITS_REFERENCE}'"
        )
    try:
        with zipfile.ZipFile(path) as zf:
            keys = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as exc:
        raise DataError(f"reference '{text}' is not a readable .npz ({exc})") from None
    if {"mu", "sigma"} <= keys:
        return Reference("stats", text, path, has_images="arr_0" in keys)
    if "arr_0" in keys:
        return Reference("npz", text, path)
    raise DataError(
        f"reference '{text}' holds {', '.join(sorted(keys)) or 'nothing'}: expected mu and sigma "
        "(precomputed statistics) or arr_0 (uint8 images [N, H, W, C])"
    )


def _file_id(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _folder_files(folder: Path) -> list[Path]:
    from noisevalue.data.image_folder import DEFAULT_EXTENSIONS, _find_images

    files = _find_images(folder, DEFAULT_EXTENSIONS)
    if len(files) < 2:
        raise DataError(f"reference folder '{folder}' holds {len(files)} image(s); a Fréchet distance needs at least 2")
    return files


def _read_files(files: list[Path]) -> torch.Tensor:
    """uint8 ``[n, 3, H, W]`` of image files of one size."""
    from PIL import Image

    batch, first = [], None
    for f in files:
        try:
            with Image.open(f) as im:
                array = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except OSError as exc:
            raise DataError(f"reference image '{f}' cannot be read ({exc})") from None
        if first is None:
            first = (array.shape, f)
        elif array.shape != first[0]:
            raise DataError(
                f"reference image '{f}' is {array.shape[1]}x{array.shape[0]} but '{first[1]}' is "
                f"{first[0][1]}x{first[0][0]}: the images of a reference folder must have one size"
            )
        batch.append(array)
    return torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def reference_key(ref: Reference, evaluator: Any) -> dict[str, Any]:
    """What the cached statistics of ``ref`` depend on: the evaluator's features and the
    reference's content."""
    key: dict[str, Any] = {"kind": ref.kind, **evaluator.reference_key()}
    if ref.kind in ("npz", "stats"):
        assert ref.path is not None
        key["file"] = _file_id(ref.path)
    elif ref.kind == "folder":
        assert ref.path is not None
        digest = hashlib.sha256()
        for f in _folder_files(ref.path):
            st = f.stat()
            digest.update(f"{f.relative_to(ref.path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        key["folder"] = str(ref.path.resolve())
        key["files_sha256"] = digest.hexdigest()
    elif ref.kind == "digits":
        key["digits"] = {"split": "test", "holdout_fraction": 0.2, "seed": 0}
    elif ref.kind == "dataset":
        assert ref.component is not None
        dataset = ref.dataset()
        fingerprint = getattr(dataset, "fingerprint", None)
        key["dataset"] = fingerprint() if callable(fingerprint) else ref.component.model_dump(mode="json")
        key["items"] = len(dataset)
        key["count"] = min(ref.count, len(dataset)) if ref.count is not None else len(dataset)
        key["seed"] = ref.seed
    return key


def default_stats_cache() -> Path:
    from noisevalue.evaluators.digit_features import default_cache_dir

    return default_cache_dir() / "reference_stats"


def _stats_count(path: Path | None) -> int | None:
    """The image count ``n`` stored beside ``mu``/``sigma`` (absent in ADM's files)."""
    with np.load(path) as data:  # type: ignore[arg-type]
        return int(data["n"]) if "n" in data.files else None


def _cache_file(ref: Reference, key: dict[str, Any], cache_dir: str | Path | None) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
    name = ref.path.stem if ref.path else (ref.component.name if ref.component else ref.label)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "reference"
    cache = Path(cache_dir).expanduser() if cache_dir else default_stats_cache()
    return cache / f"{stem}-{key.get('features', 'features')}-{digest}.npz"


def prepare_reference(
    evaluator: Any, ref: Reference, cache_dir: str | Path | None = None, say: Callable[[str], Any] = print,
    info: DistInfo = SINGLE, joined: bool = False,
) -> dict[str, Any]:
    """Give ``evaluator`` its reference: statistics from a stats file or the cache, or the
    reference images (statistics then cached, when the evaluator keeps any). Returns what
    was used (for eval.json), on rank 0.

    In a run of several processes, rank 0 decides and tells the others; the images are read
    by every process, each its share, when the evaluator has ``joined`` the process group,
    else by rank 0 alone."""
    plan: dict[str, Any] = {}
    if info.is_main:
        plan = _plan(evaluator, ref, cache_dir, say)
    plan = broadcast_object(plan, info)
    if plan["action"] == "loaded":
        return plan["used"]
    counted = [0]

    def counting() -> Iterator[torch.Tensor]:
        for batch in ref.blocks(*((info.rank, info.world_size) if joined else (0, 1))):
            counted[0] += len(batch)
            yield batch

    if joined or info.is_main:
        evaluator.prepare(counting())
    if joined and info.distributed:  # every process read its share
        counted[0] = int(all_reduce_sum(torch.tensor([counted[0]], device=info.device), info))
    if not info.is_main:
        return {}
    # an evaluator that read a statistics file of its own says how many images it stands for
    n = int(getattr(evaluator, "reference_count", None) or counted[0])
    if plan["cache"] is None:
        say(f"reference: {n} images (this evaluator keeps no statistics to cache)")
        return {"stats": None, "cache_hit": None, "reference_n": n}
    cached = Path(plan["cache"])
    evaluator.save_reference(cached)
    atomic_write_text(cached.with_suffix(".json"), json.dumps(plan["key"], indent=2, sort_keys=True, default=str))
    shown = display_path(cached)
    say(f"reference statistics: computed from {n} images, cached as {shown}")
    return {"stats": shown, "cache_hit": False, "reference_n": n}


def _plan(evaluator: Any, ref: Reference, cache_dir: str | Path | None, say: Callable[[str], Any]) -> dict[str, Any]:
    """Rank 0's decision: the statistics were ``loaded`` (a stats file, the cache), or are to
    be computed (and cached as ``cache`` when the evaluator keeps statistics)."""
    cacheable = evaluator.reference_key() is not None
    if ref.kind == "stats":
        if not cacheable and not ref.has_images:
            raise ConfigError(
                f"reference '{ref.path}' holds statistics, but {type(evaluator).__name__} keeps none; "
                "give reference images (an .npz with arr_0, an image folder)"
            )
        if cacheable:
            try:
                evaluator.load_reference(ref.path)
                say(f"reference statistics: {ref.path}")
                return {"action": "loaded", "used": {"stats": str(ref.path), "cache_hit": None,
                                                     "reference_n": _stats_count(ref.path)}}
            except ConfigError:
                if not ref.has_images:
                    raise
                say(f"reference '{ref.path}': its mu/sigma do not fit these features; using its arr_0 images")
    if not cacheable:
        return {"action": "compute", "cache": None}
    key = reference_key(ref, evaluator)
    cached = _cache_file(ref, key, cache_dir)
    if cached.is_file():
        try:
            evaluator.load_reference(cached)
            say(f"reference statistics: cache hit {display_path(cached)}")
            return {"action": "loaded", "used": {"stats": display_path(cached), "cache_hit": True,
                                                 "reference_n": _stats_count(cached)}}
        except UserError as exc:
            say(f"reference statistics: ignoring unreadable cache {display_path(cached)} ({exc})")
    return {"action": "compute", "cache": str(cached), "key": key}
