"""``noisevalue compare``: training-side methods side by side, from one stage-(i) checkpoint.

Each method is a registered component: a selector (how each sample's noise is chosen among
k candidates: ``rater``, ``max_norm``, a plugin's) or a loss weighting (``min_snr``, ``p2``,
a plugin's). A method is named by a label of the recipe's ``select.methods`` (with its
parameters) or by its registry name (with its factory's defaults), so a plugin's method
takes part without any change here. Every method continues the shared stage-(i) checkpoint
for ``select.steps`` steps with the same budget and the same paired seeds as vanilla, in
the protocol's folders (``select/<label>``), so what the protocol or an earlier compare
trained is reused. NoiseRater is the method ``rater``: its stage (ii) runs first.

Writes ``compare.md`` / ``.csv``: per metric, the paired differences from vanilla with 95%
intervals, p-values (raw and adjusted over the page by Holm and Benjamini-Hochberg) and the
minimum detectable effect (see :mod:`.tables`); ``compare.png``, their forest plot, and
``compare_curves.png``, the metrics against steps; and ``compare_timings.md``: the wall
time of each method's continuation.

With ``--budget wall`` or ``--budget flops``, every method is also compared with vanilla given
the same compute (:mod:`.budget`): ``compare_budget.md`` / ``.csv`` / ``.png``.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

from noisevalue.checkpoint import atomic_write_text
from noisevalue.config import Component, Recipe, method_kind, trial_build
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.noise_tables import write_noise_tables
from noisevalue.experiments.protocol import VANILLA, continuations, method_dir, run_folders
from noisevalue.experiments.tables import tables_for, write_tables

STEM = "compare"


def compare_methods(recipe: Recipe, names: Sequence[str]) -> dict[str, Component]:
    """Vanilla and the named methods, by label: a ``select.methods`` entry or a registry
    name (factory defaults); without names, all of ``select.methods``. Checked and, where
    cheap, built once, so that a wrong name or value stops before any training."""
    methods = recipe.select.methods
    chosen = {VANILLA: methods.get(VANILLA, Component(name="random", params={"k": 1}))}
    for name in names or [label for label in methods if label != VANILLA]:
        if name in chosen:
            raise ConfigError(f"--method {name}: given twice")
        chosen[name] = methods.get(name, Component(name=name))
    for label, comp in chosen.items():
        where = f"select.methods.{label}" if label in methods else f"--method {label}"
        trial_build(where, method_kind(where, comp), comp)
    return chosen


def run_compare(recipe: Recipe, info: DistInfo, say: stages.Say, methods: Sequence[str] = (),
                budget: str | None = None) -> list[Path]:
    chosen = compare_methods(recipe, methods)
    recipe = stages.replace(recipe, select=stages.replace(recipe.select, methods=chosen))
    say(f"compare: {', '.join(chosen)}; {recipe.select.steps} steps each from the stage-(i) checkpoint, "
        f"seeds {recipe.continuation_seeds()}")
    runs, origin = continuations(recipe, info, say)
    root = Path(recipe.output_dir)
    paths = [root / f"{STEM}.{ext}" for ext in ("md", "csv", "png")] + [root / f"{STEM}_curves.png", root / WALL_TIMES]
    if info.is_main:
        tables = tables_for(f"continuation from step {origin}", runs, VANILLA)
        write_tables(tables, root, STEM)
        paths += write_noise_tables(run_folders(recipe, runs), root, STEM, recipe.diffusion.num_timesteps,
                                    recipe.select.steps)
        atomic_write_text(root / WALL_TIMES, wall_time_table(recipe, list(chosen)))
        say("compare: " + " ".join(str(p) for p in paths))
    barrier(info)
    if budget is not None:
        from noisevalue.experiments.budget import budget_matched

        paths += budget_matched(recipe, info, say, budget, runs, origin, list(chosen))
    return paths


#: the methods' wall times: apart from the tables, which a rerun reproduces byte for byte
WALL_TIMES = "compare_timings.md"


def mean_wall_times(recipe: Recipe, labels: list[str]) -> dict[str, float | None]:
    """Each method's continuation wall time, mean over the seeds that recorded one."""
    times = {}
    for label in labels:
        found = [stages.wall_time(method_dir(recipe, label, s)) for s in recipe.continuation_seeds()]
        known = [t for t in found if t is not None]
        times[label] = statistics.mean(known) if known else None
    return times


def wall_time_table(recipe: Recipe, labels: list[str]) -> str:
    """Markdown: each method's continuation wall time (mean over seeds, as recorded when
    each finished; runs reused from before this build may have none)."""
    lines = [f"Wall time of each continuation ({recipe.select.steps} steps), mean over seeds:", "",
             "| method | kind | seconds | x vanilla |", "|---|---|---|---|"]
    times = mean_wall_times(recipe, labels)
    base = times.get(VANILLA)
    for label in labels:
        t = times[label]
        kind = method_kind(label, recipe.select.methods[label]).replace("_", " ")
        ratio = f"{t / base:.2f}" if t is not None and base else "-"
        lines.append(f"| {label} | {kind} | {'-' if t is None else f'{t:.1f}'} | {ratio} |")
    return "\n".join(lines) + "\n"
