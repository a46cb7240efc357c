"""``noisevalue eval``: the Fréchet distance of a samples ``.npz`` to a reference.

The distance is computed by the same :class:`~noisevalue.evaluators.fid.FIDEvaluator` that
scores runs during training (``fid``: Inception features; ``fd_digits``: the digit
classifier's features). The reference can be precomputed statistics (an ``.npz`` with
``mu`` and ``sigma``, the ADM format), a reference batch (an ``.npz`` with ``arr_0``), an
image folder, the held-out digits (``digits``), or a dataset component of a recipe.
Statistics of image references are computed once and cached as ``mu``/``sigma`` ``.npz``
files keyed by the reference (path, size and modification time of its files) and the
feature space (features, antialias, Inception weights file).
"""

from __future__ import annotations

import hashlib
import json
import re
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisevalue import registry
from noisevalue.checkpoint import atomic_write_text
from noisevalue.config import Component
from noisevalue.errors import ConfigError, DataError, WeightsUnavailableError
from noisevalue.workflows.sampling import display_path

__all__ = [
    "DIGITS_REFERENCE",
    "EVAL_FILE",
    "METRICS",
    "NpzImages",
    "Reference",
    "build_evaluator",
    "default_metric",
    "default_stats_cache",
    "parse_reference",
    "prepare_reference",
    "reference_key",
    "score_samples",
]

EVAL_FILE = "eval.json"
DIGITS_REFERENCE = "digits"
METRICS = {"fid": "inception", "fd_digits": "digits"}  # metric name -> FIDEvaluator features
_BATCH = 256  # images read per step


# -------------------------------------------------------------------------- samples
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

    def batches(self, size: int = _BATCH, limit: int | None = None) -> Iterator[torch.Tensor]:
        """uint8 tensors ``[n, C, H, W]`` of the first ``limit`` images (all by default)."""
        n = len(self) if limit is None else min(limit, len(self))
        per_image = int(np.prod(self.shape[1:]))
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as fh:
            _npy_header(fh)
            for start in range(0, n, size):
                count = min(size, n - start)
                raw = fh.read(count * per_image)
                if len(raw) != count * per_image:
                    raise DataError(f"'{self.path}' is truncated: '{self.key}' ends before image {start + len(raw) // per_image}")
                array = np.frombuffer(raw, dtype=np.uint8).reshape(count, *self.shape[1:])
                yield torch.from_numpy(array.copy()).permute(0, 3, 1, 2)


def default_metric(channels: int, height: int, width: int) -> str:
    """``fd_digits`` for 8x8 one-channel images, else ``fid``."""
    return "fd_digits" if channels == 1 and height == width == 8 else "fid"


# -------------------------------------------------------------------------- evaluator
def build_evaluator(
    metric: str,
    weights: str | Path | None = None,
    antialias: bool | None = None,
    params: dict[str, Any] | None = None,
) -> Any:
    """A :class:`FIDEvaluator` for ``metric`` (``fid`` or ``fd_digits``); ``params`` are
    further constructor arguments (e.g. a recipe evaluator's), overridden by the options."""
    from noisevalue.evaluators.fid import FIDEvaluator

    if metric not in METRICS:
        raise ConfigError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
    features = METRICS[metric]
    kwargs = {k: v for k, v in (params or {}).items() if k not in ("reference_stats", "features", "metric_name")}
    kwargs["features"] = features
    kwargs.setdefault("device", "cuda" if torch.cuda.is_available() else "cpu")
    if features == "inception":
        if weights is not None:
            kwargs["weights_path"] = str(weights)
        if antialias is not None:
            kwargs["antialias"] = bool(antialias)
    else:
        if weights is not None or antialias:
            raise ConfigError(f"--weights and --antialias apply only to --metric fid, not {metric}")
        kwargs.pop("weights_path", None)
        kwargs.pop("antialias", None)
    try:
        evaluator: Any = FIDEvaluator(**kwargs)
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(f"{exc}; for `noisevalue eval`: --weights FILE") from None
    # what decides the features, for the cache key and eval.json (FIDEvaluator keeps no copy)
    evaluator.feature_settings = {"features": features}
    if features == "inception":
        evaluator.feature_settings.update(
            antialias=bool(kwargs.get("antialias", False)), weights=str(kwargs.get("weights_path"))
        )
    return evaluator


# -------------------------------------------------------------------------- reference
@dataclass
class Reference:
    """What the samples are compared with.

    ``kind``: ``stats`` (an .npz with mu/sigma), ``npz`` (an .npz with arr_0 images),
    ``folder`` (image files), ``digits`` (the held-out digits) or ``dataset`` (a recipe's
    dataset component)."""

    kind: str
    label: str
    path: Path | None = None
    component: Component | None = None
    has_images: bool = False  # a stats .npz that also holds arr_0 (ADM reference batches)


def parse_reference(reference: str | Path | Component) -> Reference:
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


def reference_key(ref: Reference, evaluator: Any) -> dict[str, Any]:
    """What the cached statistics of ``ref`` depend on."""
    key: dict[str, Any] = {"kind": ref.kind, **evaluator.feature_settings}
    if evaluator.features == "inception":
        key["weights"] = _file_id(Path(evaluator.feature_settings["weights"]))
    elif evaluator.features == "digits":
        from noisevalue.evaluators.digit_features import DigitFeatureConfig

        key["digit_features"] = DigitFeatureConfig().key()
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
        key["dataset"] = ref.component.model_dump(mode="json")
    return key


def _reference_batches(ref: Reference) -> Iterator[torch.Tensor]:
    if ref.kind in ("npz", "stats"):
        yield from NpzImages(ref.path, "reference").batches()  # type: ignore[arg-type]
    elif ref.kind == "folder":
        yield from _folder_batches(ref.path)  # type: ignore[arg-type]
    elif ref.kind == "digits":
        from noisevalue.evaluators.digit_features import digits_split

        images, _ = digits_split("test")
        yield from images.split(_BATCH)
    else:
        yield from _dataset_batches(ref.component)  # type: ignore[arg-type]


def _folder_batches(folder: Path) -> Iterator[torch.Tensor]:
    from PIL import Image

    files = _folder_files(folder)
    size = None
    for start in range(0, len(files), _BATCH):
        batch = []
        for f in files[start : start + _BATCH]:
            try:
                with Image.open(f) as im:
                    array = np.asarray(im.convert("RGB"), dtype=np.uint8)
            except OSError as exc:
                raise DataError(f"reference image '{f}' cannot be read ({exc})") from None
            if size is None:
                size = (array.shape, f)
            elif array.shape != size[0]:
                raise DataError(
                    f"reference image '{f}' is {array.shape[1]}x{array.shape[0]} but '{size[1]}' is "
                    f"{size[0][1]}x{size[0][0]}: the images of a reference folder must have one size"
                )
            batch.append(array)
        yield torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2)


def _dataset_batches(component: Component) -> Iterator[torch.Tensor]:
    from noisevalue.workflows.build import image_to_unit

    dataset = registry.build("dataset", component, where="data.eval_dataset")
    n = len(dataset)
    if n < 2:
        raise DataError(f"reference dataset {component.name}: {n} image(s); a Fréchet distance needs at least 2")
    if hasattr(dataset, "images"):
        yield from image_to_unit(dataset.images).split(_BATCH)
        return
    for start in range(0, n, _BATCH):
        yield image_to_unit(torch.stack([dataset[i][0] for i in range(start, min(start + _BATCH, n))]))


def _stats_count(path: Path | None) -> int | None:
    """The image count ``n`` stored beside ``mu``/``sigma`` (absent in ADM's files)."""
    with np.load(path) as data:  # type: ignore[arg-type]
        return int(data["n"]) if "n" in data.files else None


def default_stats_cache() -> Path:
    from noisevalue.evaluators.digit_features import default_cache_dir

    return default_cache_dir() / "reference_stats"


def prepare_reference(
    evaluator: Any, ref: Reference, cache_dir: str | Path | None = None, say: Callable[[str], Any] = print
) -> dict[str, Any]:
    """Give ``evaluator`` the reference statistics: from a stats file, from the cache, or
    computed from the images (then cached). Returns what was used (for eval.json)."""
    from noisevalue.errors import UserError

    if ref.kind == "stats":
        evaluator.reference_stats = ref.path
        try:
            evaluator.prepare([])
            say(f"reference statistics: {ref.path}")
            return {"stats": str(ref.path), "cache_hit": None, "reference_n": _stats_count(ref.path)}
        except ConfigError:
            if not ref.has_images:
                raise
            say(f"reference '{ref.path}': its mu/sigma are not {evaluator.features} statistics; using its arr_0 images")
    key = reference_key(ref, evaluator)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = ref.path.stem if ref.path else (ref.component.name if ref.component else ref.label)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "reference"
    cache = Path(cache_dir).expanduser() if cache_dir else default_stats_cache()
    cached = cache / f"{stem}-{evaluator.features}-{digest}.npz"
    if cached.is_file():
        evaluator.reference_stats = cached
        try:
            evaluator.prepare([])
            say(f"reference statistics: cache hit {display_path(cached)}")
            return {"stats": display_path(cached), "cache_hit": True, "reference_n": _stats_count(cached)}
        except UserError as exc:
            say(f"reference statistics: ignoring unreadable cache {display_path(cached)} ({exc})")
    evaluator.reference_stats = None
    counted = [0]

    def counting() -> Iterator[torch.Tensor]:
        for batch in _reference_batches(ref):
            counted[0] += len(batch)
            yield batch

    evaluator.prepare(counting())
    evaluator.save_reference_stats(cached)
    atomic_write_text(cached.with_suffix(".json"), json.dumps(key, indent=2, sort_keys=True))
    n = counted[0]
    say(f"reference statistics: computed from {n} images, cached as {display_path(cached)}")
    return {"stats": display_path(cached), "cache_hit": False, "reference_n": n}


# -------------------------------------------------------------------------- scoring
def score_samples(
    samples: str | Path,
    reference: str | Path | Component,
    metric: str | None = None,
    weights: str | Path | None = None,
    antialias: bool | None = None,
    num: int | None = None,
    stats_cache: str | Path | None = None,
    evaluator_params: dict[str, Any] | None = None,
    reference_label: str | None = None,
    say: Callable[[str], Any] = print,
    evaluator: Any = None,
) -> dict[str, Any]:
    """Score the ``arr_0`` images of ``samples`` against ``reference``; writes
    ``eval.json`` next to ``samples`` and returns its record. ``evaluator``: one made by
    :func:`build_evaluator` (then ``metric``, ``weights``, ``antialias`` and
    ``evaluator_params`` are not used)."""
    images = NpzImages(samples)
    if num is not None:
        if num < 2:
            raise ConfigError(f"--num: a Fréchet distance needs at least 2 images, got {num}")
        if num > len(images):
            raise DataError(f"samples file '{images.path}' holds {len(images)} images, fewer than --num {num}")
    n = len(images) if num is None else num
    if evaluator is None:
        metric = metric or default_metric(images.channels, images.shape[1], images.shape[2])
        evaluator = build_evaluator(metric, weights, antialias, evaluator_params)
    ref = parse_reference(reference)
    used = prepare_reference(evaluator, ref, stats_cache, say)
    value = float(evaluator.evaluate(images.batches(limit=n))[evaluator.metric_name])
    settings = dict(evaluator.feature_settings)
    record = {
        "metric": evaluator.metric_name,
        "value": value,
        "samples": images.path.name,
        "n": n,
        "reference": reference_label or ref.label,
        **used,
        "settings": settings,
    }
    _write_eval_json(images.path.parent / EVAL_FILE, record)
    return record


def _write_eval_json(path: Path, record: dict[str, Any]) -> None:
    """The latest result at the top level; every distinct result under ``results``."""
    results: list[dict[str, Any]] = []
    if path.is_file():
        try:
            results = list(json.loads(path.read_text()).get("results", []))
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
            results = []

    def same(a: dict) -> bool:
        return all(a.get(k) == record.get(k) for k in ("metric", "samples", "n", "reference", "settings"))

    results = [r for r in results if not same(r)] + [record]
    atomic_write_text(path, json.dumps({**record, "results": results}, indent=2, sort_keys=True))
