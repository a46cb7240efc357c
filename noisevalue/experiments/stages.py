"""Stages: the runs that the protocol and the experiment commands are made of.

A stage is one recipe run (pretrain, meta_train, or a continuation) in a folder of its own.
A stage whose folder holds a ``DONE`` marker is reused; one with checkpoints but no marker
is resumed. Each stage records the settings it ran with (``stage.json``): reusing a folder
with settings that would change its result is an error, never a silent mix of two runs.

Shared layout under a recipe's ``output_dir`` (what every command reuses):

    pretrain/                 stage (i)
    rater/                    stage (ii): the full rater on the stage-(i) checkpoint
    select/<method>/          stage (iii) per selection method
    <dir>-seed<N>/            the same stage with another seed (``select.seeds``)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel

from noisevalue import registry
from noisevalue.checkpoint import atomic_write_text, latest_checkpoint
from noisevalue.config import STAGE_SETTINGS, Component, LogConfig, Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.train.metric_protocol import ROW_KEY

DONE = "DONE"
TIMINGS = "timings.json"  # the stage's wall time: apart, so that every other file a rerun writes is identical

# the sections that decide a stage's result, per workflow
_RELEVANT = {
    "pretrain": ("seed", "data", "model", "diffusion", "train", "sample", "eval"),
    "meta_train": ("seed", "data", "model", "diffusion", "rater", "meta"),
}
# settings that change speed or placement, not results
_IGNORED = {
    "data.latent_cache", "data.num_workers", "data.encode_batch_size", "data.cache_shard_size",
    "train.threads", "train.device", "train.dist_timeout", "train.log_every", "sample.batch_size", "meta.log_every",
}

Say = Callable[[str], Any]
M = TypeVar("M", bound=BaseModel)


def stage_recipe(recipe: Recipe, output_dir: Path, workflow: str | None = None, seed: int | None = None) -> Recipe:
    """A copy of ``recipe`` for one stage in ``output_dir`` (running ``workflow`` with
    ``seed``, by default the recipe's), sharing the recipe's latent cache. Copies of
    validated sections, not a re-parse: change a section with :func:`replace`."""
    return replace(
        recipe, output_dir=str(output_dir), workflow=workflow or recipe.workflow,
        seed=recipe.seed if seed is None else seed,
        data=replace(recipe.data, latent_cache=latent_cache(recipe)), log=stage_log(recipe),
    )


def stage_log(recipe: Recipe) -> LogConfig:
    """The trackers' settings of a stage of ``recipe``: grouped under the experiment's folder
    name, and (unless set) logging to one MLflow store in the experiment's folder."""
    from noisevalue.train.trackers import mlflow_uri

    root = Path(recipe.output_dir)
    return replace(recipe.log, group=recipe.log.group or root.resolve().name,
                   mlflow_tracking_uri=mlflow_uri(recipe, root))


def replace(section: M, **fields: Any) -> M:
    """A copy of a recipe section (or the recipe) with ``fields`` replaced; each must be a
    field of that section."""
    unknown = sorted(set(fields) - set(type(section).model_fields))
    if unknown:
        raise TypeError(f"{type(section).__name__} has no field {unknown[0]!r}")
    return section.model_copy(update=fields)


def seeded_dir(base: Path, seed: int, recipe: Recipe) -> Path:
    """``base`` for the recipe's own seed, ``base-seed<N>`` for the others."""
    return base if seed == recipe.seed else base.with_name(f"{base.name}-seed{seed}")


def stage_settings(recipe: Recipe) -> dict[str, Any]:
    data = recipe.model_dump(mode="json")
    flat: dict[str, Any] = {"workflow": recipe.workflow}
    for section in _RELEVANT.get(recipe.workflow, ()):
        _flatten(data[section], section, flat)
    return {k: v for k, v in flat.items() if k not in _IGNORED}


def default_settings(recipe: Recipe) -> dict[str, Any]:
    """The flattened defaults of the recipe's sections that can be built without values."""
    flat: dict[str, Any] = {}
    for section in _RELEVANT.get(recipe.workflow, ()):
        model = getattr(recipe, section)
        if not isinstance(model, BaseModel):
            continue
        required = {k: getattr(model, k) for k, f in type(model).model_fields.items() if f.is_required()}
        try:  # a section with required fields (data: dataset) takes the recipe's own for them
            default = type(model)(**required)
        except ValueError:
            continue
        _flatten(default.model_dump(mode="json"), section, flat)
    return flat


def _flatten(node: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(node, dict) and node and not prefix.endswith(".params"):
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}", out)
    else:
        out[prefix] = node


def changed_settings(old: Recipe, new: Recipe) -> list[tuple[str, Any, Any]]:
    """The result-relevant settings that differ between two recipes: ``(key, old, new)``."""
    a, b = stage_settings(old), stage_settings(new)
    return [(k, a.get(k), b.get(k)) for k in sorted(a.keys() | b.keys()) if a.get(k) != b.get(k)]


def check_stage_settings(recipe: Recipe) -> None:
    """Refuse to reuse a stage folder that ran with different settings."""
    path = Path(recipe.output_dir) / STAGE_SETTINGS
    if not path.is_file():
        return
    old = json.loads(path.read_text())
    new = stage_settings(recipe)
    defaults = default_settings(recipe)
    # a setting added to noisevalue after the stage ran is absent from its file: at its
    # default it changes nothing, so older stages stay reusable
    changed = differing(old, new, defaults)
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(
            f"stage '{recipe.output_dir}' ran with {k}={old.get(k)!r}, the recipe now says "
            f"{new.get(k)!r}{more}; remove that folder to rerun it, or set output_dir=... for a new run"
        )


def differing(old: dict[str, Any], new: dict[str, Any], defaults: dict[str, Any] | None = None) -> list[str]:
    """The keys, sorted, whose recorded value ``old`` differs from ``new``. A key absent from
    ``old`` counts at its value in ``defaults``; one existing file or folder named two ways
    (relatively, absolutely, through a link) is the same value."""
    defaults = defaults or {}
    return sorted(k for k in old.keys() | new.keys() if not _same(old.get(k, defaults.get(k)), new.get(k)))


def _same(a: Any, b: Any) -> bool:
    """Equal settings, where two spellings of one existing file or folder are equal (a run
    folder named relatively, absolutely, or through a link: its stages record the paths of
    the stages they start from as they were written)."""
    if a == b:
        return True
    if isinstance(a, str) and isinstance(b, str):
        try:
            return os.path.samefile(a, b)
        except OSError:  # either does not exist (or is not a path at all)
            return False
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return False


def write_stage_recipe(recipe: Recipe) -> None:
    """The stage's own resolved recipe, ``recipe.yaml`` (what ``noisevalue sample`` reads)."""
    from omegaconf import OmegaConf

    from noisevalue.config import RESOLVED_RECIPE

    path = Path(recipe.output_dir) / RESOLVED_RECIPE
    text = OmegaConf.to_yaml(OmegaConf.create(recipe.model_dump(mode="json")))
    if not path.is_file() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text)


def run_stage(recipe: Recipe, info: DistInfo, say: Say) -> dict:
    """Run (or reuse, or resume) one stage; returns its final metrics."""
    from noisevalue.train.run import run_trainer

    run_dir = Path(recipe.output_dir)
    check_stage_settings(recipe)
    if info.is_main:
        write_stage_recipe(recipe)
    marker = run_dir / DONE
    if marker.is_file():
        say(f"stage {run_dir}: done already, reused")
        return json.loads(marker.read_text()).get("metrics", {})
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    say(f"stage {run_dir}: {'resuming' if resume else 'starting'} ({stage_kind(recipe)})")
    if info.is_main:
        atomic_write_text(run_dir / STAGE_SETTINGS, json.dumps(stage_settings(recipe), indent=1, sort_keys=True))
    barrier(info)
    start = time.perf_counter()
    metrics = run_trainer(recipe, run_dir, info, resume=resume)
    if info.is_main:  # the wall time of this (last) run of the stage, a resume's own only
        wall = time.perf_counter() - start
        atomic_write_text(run_dir / TIMINGS, json.dumps({"wall_s": wall}, indent=2))
        atomic_write_text(marker, json.dumps({"metrics": metrics}, indent=2))
        shown = ", ".join(f"{k} {v:.4g}" for k, v in metrics.items() if "baseline" not in k)
        took = f"{wall:.0f} s" if wall < 120 else f"{wall / 60:.1f} min"
        say(f"stage {run_dir}: done in {took}{'; ' + shown if shown else ''}")
    barrier(info)
    return metrics


def stage_kind(recipe: Recipe) -> str:
    """What a stage does, in words: pretraining (i), meta-training (ii) or a continuation (iii)."""
    if recipe.workflow == "meta_train":
        return "stage (ii): meta-training the rater" if recipe.meta.outer_steps else "stage (ii): the untrained rater"
    if recipe.train.init_from:  # named by its folder: the method's label (and seed)
        return f"stage (iii): continuation '{Path(recipe.output_dir).name}'"
    return "stage (i): pretraining"


def wall_time(run_dir: Path) -> float | None:
    """Seconds the stage's finishing run took (None: not recorded)."""
    path = Path(run_dir) / TIMINGS
    if not (Path(run_dir) / DONE).is_file() or not path.is_file():
        return None
    value = json.loads(path.read_text()).get("wall_s")
    return None if value is None else float(value)


def latent_cache(recipe: Recipe) -> str:
    return recipe.data.latent_cache or str(Path(recipe.output_dir) / "latents")


def pretrain(recipe: Recipe, info: DistInfo, say: Say, run_dir: Path | None = None) -> Path:
    """Stage (i) of ``recipe`` (default folder ``<output_dir>/pretrain``); returns its folder."""
    run_dir = run_dir or Path(recipe.output_dir) / "pretrain"
    run_stage(stage_recipe(recipe, run_dir, workflow="pretrain"), info, say)
    return run_dir


def train_rater(
    recipe: Recipe, info: DistInfo, say: Say, pretrained: str | Path, run_dir: Path,
    rater: Component | None = None, seed: int | None = None, outer_steps: int | None = None,
) -> Path:
    """Stage (ii): meta-train ``rater`` (default: the recipe's) on ``pretrained`` for
    ``outer_steps`` (default: ``meta.outer_steps``)."""
    assert rater is not None or recipe.rater is not None
    meta = replace(recipe.meta, pretrained=str(pretrained))
    if outer_steps is not None:
        meta = replace(meta, outer_steps=outer_steps)
    stage = replace(stage_recipe(recipe, run_dir, workflow="meta_train", seed=seed), meta=meta,
                    rater=rater or recipe.rater)
    run_stage(stage, info, say)
    return run_dir


def continue_training(
    recipe: Recipe, info: DistInfo, say: Say, init_from: str | Path, run_dir: Path,
    method: Component, steps: int, seed: int | None = None,
) -> list[dict]:
    """Stage (iii): ``steps`` more steps from ``init_from`` with ``method``: a selector
    choosing the noise, or a loss weighting or timestep sampler (with i.i.d. noise);
    returns the evaluation rows after the starting step."""
    from noisevalue.checkpoint import read_meta, resolve_checkpoint
    from noisevalue.config import method_kind

    origin = read_meta(resolve_checkpoint(init_from)).step
    train = replace(recipe.train, steps=origin + steps, init_from=str(init_from))
    kind = method_kind("method", method)
    if kind == "selector":
        train = replace(train, selector=method)
    else:  # i.i.d. noise, with the method's loss weighting or timestep distribution
        train = replace(train, selector=Component(name="random", params={"k": 1}), **{kind: method})
    stage = replace(
        stage_recipe(recipe, run_dir, workflow="pretrain", seed=seed),
        train=train, eval=replace(recipe.eval, every=recipe.select.eval_every),
    )
    run_stage(stage, info, say)
    return evaluations(run_dir, after=origin)


START_DIR = "start"  # where a 0-step continuation scores a start (``start-seed<N>``)


def scored_start(recipe: Recipe, info: DistInfo, say: Say, checkpoint: str | Path, folder: Path,
                 seed: int) -> dict:
    """The weights of ``checkpoint`` scored with ``seed``'s sample noise and reference
    subset, so that the seed's continuations from it differ from it by training alone: a
    continuation of 0 steps in ``folder/start[-seed<N>]``. Returns its evaluation row."""
    run_dir = seeded_dir(folder / START_DIR, seed, recipe)
    continue_training(recipe, info, say, checkpoint, run_dir, Component(name="random", params={"k": 1}), 0,
                      seed=seed)
    return evaluations(run_dir)[-1]


def evaluations(run_dir: Path, after: int = -1) -> list[dict]:
    """The evaluation rows (``{"step": ..., metric: value}``) of a run after step ``after``;
    a row's ``protocol`` maps each metric to the protocol it was computed under (read from
    the digests the file keeps)."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise ConfigError(f"'{path}' is missing: the run in '{run_dir}' has not been evaluated")
    data = json.loads(path.read_text())
    known = data.get("protocols", {})
    rows = [dict(h) for h in data["history"] if h["step"] > after]
    for row in rows:
        if isinstance(row.get(ROW_KEY), dict):
            row[ROW_KEY] = {m: known.get(d, {"digest": d}) for m, d in row[ROW_KEY].items()}
    return rows


# ------------------------------------------------------------------ selectors and raters
def needed_rater(method: Component) -> str | None:
    """``"trained"`` / ``"untrained"`` when the method is a selector that declares it needs
    a rater and its recipe entry names no checkpoint; else None."""
    from noisevalue.config import method_kind
    from noisevalue.interfaces import rater_need

    if "checkpoint" in method.params or method_kind("method", method) != "selector":
        return None
    return rater_need(registry.get("selector", method.name))


def with_rater(selector: Component, raters: dict[str, Path]) -> Component:
    """The selector with its ``checkpoint`` filled from ``raters`` (by :func:`needed_rater`)."""
    need = needed_rater(selector)
    if need is None:
        return selector
    return Component(name=selector.name, params={**selector.params, "checkpoint": str(raters[need])})


def candidates(selector: Component) -> int:
    """The number of candidates k of a selector component: its ``k`` parameter, else the
    factory's default (1 when it takes none)."""
    if "k" in selector.params:
        return int(selector.params["k"])
    import inspect

    param = inspect.signature(registry.get("selector", selector.name)).parameters.get("k")
    return 1 if param is None or param.default is inspect.Parameter.empty else int(param.default)
