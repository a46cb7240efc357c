"""``noisevalue eval``: the Fréchet distance of a samples ``.npz`` to a reference.

The score comes from a registered evaluator (``--evaluator``, default ``fid``, the same
:class:`~noisevalue.evaluators.fid.FIDEvaluator` that scores runs during training: ``fid``
on Inception features, ``fd_digits`` on the digit classifier's); a plugin evaluator works
the same way. The reference can be precomputed statistics (an ``.npz`` with
``mu`` and ``sigma``, the ADM format), a reference batch (an ``.npz`` with ``arr_0``), an
image folder, the held-out digits (``digits``), or a dataset component of a recipe.
Statistics of image references are computed once and cached (:mod:`noisevalue.train.reference`,
the one cache that training evaluations use too) keyed by the reference and the evaluator's
``reference_key()`` (features, antialias, a digest of the Inception weights), for evaluators
that keep statistics.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from noisevalue import registry
from noisevalue.checkpoint import atomic_write_text
from noisevalue.config import Component
from noisevalue.data.npz_images import NpzImages
from noisevalue.errors import ConfigError, DataError, WeightsUnavailableError
from noisevalue.sampling.sample import SETTINGS_FILE
from noisevalue.train import metric_protocol as mp
from noisevalue.train.reference import (
    DIGITS_REFERENCE,
    Reference,
    default_stats_cache,
    parse_reference,
    prepare_reference,
    reference_key,
)

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
METRICS = {"fid": "inception", "fd_digits": "digits", "fd_digits32": "digits32"}  # --metric -> the fid evaluator's features
_FID_TRAINING_ONLY = ("reference_stats", "kid", "metric_name")
_PLACEMENT = ("device", "batch_size", "cache_dir")


# -------------------------------------------------------------------------- samples
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
    built-in ``fid``: its feature space (``fid``/``fd_digits``/``fd_digits32``), Inception weights and resize."""
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
    label = reference_label or ref.label
    protocol = mp.sample_metric(sampled_with(images.path, n), chosen.evaluator, chosen.name,
                                mp.reference_identity(label, ref, chosen.evaluator))
    record = {
        "metric": metric,
        "value": value,
        **({"metrics": results} if len(results) > 1 else {}),
        "samples": images.path.name,
        "n": n,
        "reference": label,
        **used,
        "settings": chosen.settings,
        "protocol": protocol,
        "protocol_sha256": mp.digest(protocol),
    }
    _write_eval_json(images.path.parent / EVAL_FILE, record)
    return record


def sampled_with(samples: Path, n: int) -> dict[str, Any] | None:
    """How ``noisevalue sample`` drew the images of ``samples`` (its ``settings.json``
    beside them), scored ``n`` at a time; None when they came from elsewhere."""
    path = samples.parent / SETTINGS_FILE
    try:
        s = json.loads(path.read_text())
        return mp.sampling(s["num_steps"], s["eta"], s["cfg_scale"], s.get("nag_scale", 0.0), n, s.get("use_ema"),
                           s.get("sampler", "ddim"))
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        return None


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    """The protocol of a number, as ``noisevalue eval`` prints it: one ``key: value`` line
    per setting."""
    return [f"  {k}: {json.dumps(v, default=str) if not isinstance(v, str) else v}"
            for k, v in mp.flatten(protocol).items()]


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
