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

With ``--budget wall``, every method is also compared with vanilla given the same wall time:
a method whose training steps took r times vanilla's (median seconds per step over the log
windows of every seed, evaluations and checkpoints left out) is set against a
vanilla continuation of ``round(r * select.steps)`` steps from the same checkpoint and seed
(``select/vanilla-<N>steps``), in ``compare_budget.md`` / ``.csv`` / ``.png``: the
compute-matched verdict beside the step-matched one.
"""

from __future__ import annotations

import json
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
from noisevalue.experiments.tables import Run, tables_for, write_tables
from noisevalue.train.run_log import TIMINGS as TIMINGS_LOG

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


BUDGETS = ("wall",)


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
        paths += budget_matched(recipe, info, say, runs, origin, list(chosen))
    return paths


def step_seconds(recipe: Recipe, label: str) -> float | None:
    """A method's seconds per training step: the median over its seeds' log windows (the
    trainer's ``train/images_per_sec``), so that evaluations and checkpoints, which fall in
    a few windows, do not count."""
    per_step = []
    for seed in recipe.continuation_seeds():
        path = method_dir(recipe, label, seed) / TIMINGS_LOG
        if path.is_file():
            for line in path.read_text().splitlines():
                ips = json.loads(line).get("train/images_per_sec")
                if ips:
                    per_step.append(recipe.train.global_batch_size / ips)
    return statistics.median(per_step) if per_step else None


def budget_steps(recipe: Recipe, labels: list[str]) -> dict[str, int]:
    """Per method, the steps vanilla trains in the wall time of the method's steps."""
    base = step_seconds(recipe, VANILLA)
    if not base:
        raise ConfigError("compare --budget wall: vanilla's continuations logged no step time "
                          f"({TIMINGS_LOG}): remove select/vanilla* to train them again")
    steps = {}
    for label in labels:
        t = step_seconds(recipe, label) if label != VANILLA else None
        if t is not None:
            steps[label] = max(1, round(recipe.select.steps * t / base))
    return steps


def budget_matched(recipe: Recipe, info: DistInfo, say: stages.Say, runs: list[Run], origin: int,
                   labels: list[str]) -> list[Path]:
    """Each method against vanilla trained for the method's wall time (see the module)."""
    steps = budget_steps(recipe, labels)
    vanilla = recipe.select.methods[VANILLA]
    pretrained = Path(recipe.output_dir) / "pretrain"
    last = origin + recipe.select.steps
    by_label: dict[str, list[Run]] = {}
    for run in runs:
        by_label.setdefault(run.label, []).append(run)
    tables = []
    for label, n in steps.items():
        ref = f"vanilla, {n} steps (the wall time of {label}'s {recipe.select.steps})"
        paired: list[Run] = []
        for seed in recipe.continuation_seeds():
            run_dir = stages.seeded_dir(Path(recipe.output_dir) / "select" / f"{VANILLA}-{n}steps", seed, recipe)
            history = stages.continue_training(recipe, info, say, pretrained, run_dir, vanilla, n, seed=seed)
            # shown at the method's last step: both rows end on the same wall-time budget
            paired.append(Run(ref, seed, origin, None, [{**row, "step": last} for row in history
                                                        if row["step"] == origin + n]))
        paired += [Run(label, r.seed, origin, None, [h for h in r.history if h["step"] == last])
                   for r in by_label[label]]
        tables += tables_for(f"{label} against vanilla on the same wall time", paired, ref)
    paths: list[Path] = []
    if info.is_main and tables:
        paths = list(write_tables(tables, Path(recipe.output_dir), f"{STEM}_budget"))
        say("compare --budget wall: " + " ".join(str(p) for p in paths))
    barrier(info)
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
