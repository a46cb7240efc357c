"""``noisevalue eval``: the Fréchet distance of a samples ``.npz`` to a reference.

The score comes from a registered evaluator (``--evaluator``, default ``fid``, the same
:class:`~noisevalue.evaluators.fid.FIDEvaluator` that scores runs during training: ``fid``
on Inception features, ``fd_digits`` on the digit classifier's); a plugin evaluator works
the same way. The reference can be precomputed statistics (an ``.npz`` with
``mu`` and ``sigma``, the ADM format), a reference batch (an ``.npz`` with ``arr_0``), an
image folder, the held-out digits (``digits``), or a dataset component of a recipe.
Statistics of image references are computed once and cached as ``.npz`` files keyed by the
reference (path, size and modification time of its files) and the evaluator's
``reference_key()`` (features, antialias, Inception weights file), for evaluators that keep
statistics.
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
from noisevalue.sampling.sample import display_path

__all__ = [
    "DIGITS_REFERENCE",
    "EVAL_FILE",
    "METRICS",
    "NpzImages",
    "Reference",
    "ChosenEvaluator",
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
METRICS = {"fid": "inception", "fd_digits": "digits"}  # --metric -> the fid evaluator's features
_FID_TRAINING_ONLY = ("reference_stats", "kid", "metric_name")
_PLACEMENT = ("device", "batch_size", "cache_dir")
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


def _unit(batch: torch.Tensor) -> torch.Tensor:
    """An evaluator's input: float images in [0, 1] (uint8 v becomes v / 255, which the
    built-in evaluators quantise back to v exactly)."""
    return batch.float() / 255 if batch.dtype == torch.uint8 else batch


def default_metric(channels: int, height: int, width: int) -> str:
    """``fd_digits`` for 8x8 one-channel images, else ``fid``."""
    return "fd_digits" if channels == 1 and height == width == 8 else "fid"


# -------------------------------------------------------------------------- evaluator
@dataclass
class ChosenEvaluator:
    """A registered evaluator, built, with the component it was built from."""

    evaluator: Any
    name: str
    params: dict[str, Any]

    @property
    def settings(self) -> dict[str, Any]:
        """What decides its numbers (for ``eval.json``): the name and the parameters except
        where and how fast it runs."""
        return {"evaluator": self.name, **{k: v for k, v in self.params.items() if k not in _PLACEMENT}}


def build_evaluator(
    name: str | None = None,
    params: dict[str, Any] | None = None,
    metric: str | None = None,
    weights: str | Path | None = None,
    antialias: bool | None = None,
    where: str = "--evaluator",
) -> ChosenEvaluator:
    """Evaluator ``name`` (default ``fid``) from the registry, with ``params`` (e.g. a recipe
    evaluator's). ``metric``, ``weights`` and ``antialias`` are the shortcuts of the
    built-in ``fid``: its feature space (``fid``/``fd_digits``), Inception weights and resize."""
    name = name or "fid"
    params = dict(params or {})
    if name == "fid":
        for key in _FID_TRAINING_ONLY:  # the reference is --reference; eval reports the distance
            params.pop(key, None)
        if metric is not None:
            if metric not in METRICS:
                raise ConfigError(f"--metric {metric}: expected one of {', '.join(METRICS)}")
            params["features"] = METRICS[metric]
        inception = params.get("features", "inception") == "inception"
        if inception:
            if weights is not None:
                params["weights_path"] = str(weights)
            if antialias is not None:
                params["antialias"] = bool(antialias)
        else:
            if weights is not None or antialias:
                raise ConfigError(f"--weights and --antialias apply only to --metric fid, not {metric}")
            params.pop("weights_path", None)
            params.pop("antialias", None)
    elif metric is not None or weights is not None or antialias is not None:
        raise ConfigError(
            f"--metric, --weights and --antialias set the built-in fid evaluator; give evaluator "
            f"'{name}' its settings with --param KEY=VALUE"
        )
    if "device" in registry.accepted("evaluator", name) and "device" not in params:
        params["device"] = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        evaluator = registry.build("evaluator", Component(name=name, params=params), where=where)
    except WeightsUnavailableError as exc:
        raise WeightsUnavailableError(f"{exc}; for `noisevalue eval`: --weights FILE") from None
    return ChosenEvaluator(evaluator, name, params)


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
    """What the cached statistics of ``ref`` depend on: the evaluator's features and the
    reference's files."""
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
    from noisevalue.train.build import image_to_unit

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
    """Give ``evaluator`` its reference: statistics from a stats file or the cache, or the
    reference images (statistics then cached, when the evaluator keeps any). Returns what
    was used (for eval.json)."""
    from noisevalue.errors import UserError

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
                return {"stats": str(ref.path), "cache_hit": None, "reference_n": _stats_count(ref.path)}
            except ConfigError:
                if not ref.has_images:
                    raise
                say(f"reference '{ref.path}': its mu/sigma do not fit these features; using its arr_0 images")
    counted = [0]

    def counting() -> Iterator[torch.Tensor]:
        for batch in _reference_batches(ref):
            counted[0] += len(batch)
            yield _unit(batch)

    if not cacheable:
        evaluator.prepare(counting())
        say(f"reference: {counted[0]} images (this evaluator keeps no statistics to cache)")
        return {"stats": None, "cache_hit": None, "reference_n": counted[0]}
    key = reference_key(ref, evaluator)
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = ref.path.stem if ref.path else (ref.component.name if ref.component else ref.label)
    stem = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)[:40] or "reference"
    cache = Path(cache_dir).expanduser() if cache_dir else default_stats_cache()
    cached = cache / f"{stem}-{key.get('features', 'features')}-{digest}.npz"
    if cached.is_file():
        try:
            evaluator.load_reference(cached)
            say(f"reference statistics: cache hit {display_path(cached)}")
            return {"stats": display_path(cached), "cache_hit": True, "reference_n": _stats_count(cached)}
        except UserError as exc:
            say(f"reference statistics: ignoring unreadable cache {display_path(cached)} ({exc})")
    evaluator.prepare(counting())
    evaluator.save_reference(cached)
    atomic_write_text(cached.with_suffix(".json"), json.dumps(key, indent=2, sort_keys=True))
    n = counted[0]
    say(f"reference statistics: computed from {n} images, cached as {display_path(cached)}")
    return {"stats": display_path(cached), "cache_hit": False, "reference_n": n}


# -------------------------------------------------------------------------- scoring
def score_samples(
    samples: str | Path,
    reference: str | Path | Component,
    chosen: ChosenEvaluator | None = None,
    num: int | None = None,
    stats_cache: str | Path | None = None,
    reference_label: str | None = None,
    say: Callable[[str], Any] = print,
) -> dict[str, Any]:
    """Score the ``arr_0`` images of ``samples`` against ``reference`` with ``chosen`` (by
    default the ``fid`` evaluator in the feature space :func:`default_metric` picks); writes
    ``eval.json`` next to ``samples`` and returns its record."""
    images = NpzImages(samples)
    if num is not None:
        if num < 2:
            raise ConfigError(f"--num: a Fréchet distance needs at least 2 images, got {num}")
        if num > len(images):
            raise DataError(f"samples file '{images.path}' holds {len(images)} images, fewer than --num {num}")
    n = len(images) if num is None else num
    if chosen is None:
        chosen = build_evaluator(metric=default_metric(images.channels, images.shape[1], images.shape[2]))
    ref = parse_reference(reference)
    used = prepare_reference(chosen.evaluator, ref, stats_cache, say)
    generated = (_unit(batch) for batch in images.batches(limit=n))
    results = {k: float(v) for k, v in chosen.evaluator.evaluate(generated).items()}
    metric, value = next(iter(results.items()))
    record = {
        "metric": metric,
        "value": value,
        **({"metrics": results} if len(results) > 1 else {}),
        "samples": images.path.name,
        "n": n,
        "reference": reference_label or ref.label,
        **used,
        "settings": chosen.settings,
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
