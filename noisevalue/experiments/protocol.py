"""The paper's three-stage protocol as one workflow, with a comparison table at the end.

    <output_dir>/pretrain/          stage (i): diffusion training with i.i.d. noise
    <output_dir>/rater/             stage (ii): rater meta-training on the stage-(i) checkpoint
    <output_dir>/rater-untrained/   the same rater before its first outer step (a control)
    <output_dir>/select/<method>/   stage (iii): continuation from stage (i) per selection method
    <output_dir>/start-seed<N>/     the stage-(i) weights scored with seed N's sample noise
    <output_dir>/comparison.{md,csv,png}, comparison_curves.png

Every continuation starts from the same checkpoint with the same seed, so the methods differ
only in how each sample's noise is chosen: they see the same images, timesteps and pool of k
candidates at every step, and vanilla trains on candidate 0 of that pool. The start column
is evaluated per seed, with the sample noise that seed's later evaluations use. A selector that declares ``needs_rater`` gets the
rater of its own seed: the meta-trained one (``rater``) or its untrained initialisation
(``random_rater``). With ``select.seeds`` listing several seeds, stages (ii) and (iii) run
once per seed (folders ``<name>-seed<N>``) and the tables report the mean, a 95% confidence
interval and, against vanilla training, the paired difference with its interval, p-value
(also adjusted over all the tests of the page) and minimum detectable effect, for every
metric (the held-out loss first); ``comparison.png`` is their forest plot.
"""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Component, Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.experiments import stages
from noisevalue.experiments.noise_tables import write_noise_tables
from noisevalue.experiments.results import Run
from noisevalue.experiments.tables import primary_metric, tables_for, write_tables

VANILLA = "vanilla"
UNTRAINED_DIR = "rater-untrained"


def start_row(run_dir: Path) -> dict:
    """The last evaluation of a run (the start of its continuations)."""
    return stages.evaluations(run_dir)[-1]


def seed_start(recipe: Recipe, info: DistInfo, say: stages.Say, pretrained: Path, seed: int) -> dict:
    """The evaluation a seed's continuations start from: the stage-(i) weights scored with
    that seed's sample noise and reference subset, so that its later evaluations differ from
    it by training alone. For the recipe's own seed that is stage (i)'s last evaluation (the
    same weights and seed); for another, a continuation of 0 steps (``start-seed<N>``). The
    held-out loss does not depend on the seed."""
    if seed == recipe.seed:
        return start_row(pretrained)
    return stages.scored_start(recipe, info, say, pretrained, Path(recipe.output_dir), seed)


def seed_rater(recipe: Recipe, info: DistInfo, say: stages.Say, pretrained: Path, seed: int,
               rater: Component | None = None, base: Path | None = None) -> Path:
    """The rater for one seed (default folder ``<output_dir>/rater``, or ``-seed<N>``)."""
    base = base or Path(recipe.output_dir) / "rater"
    return stages.train_rater(recipe, info, say, pretrained, stages.seeded_dir(base, seed, recipe),
                              rater=rater, seed=seed)


def untrained_rater(recipe: Recipe, info: DistInfo, say: stages.Say, pretrained: Path, seed: int) -> Path:
    """The seed's rater as initialised, before any outer step (``meta.outer_steps=0``): the
    same architecture and initial weights the meta-trained rater started from."""
    run_dir = stages.seeded_dir(Path(recipe.output_dir) / UNTRAINED_DIR, seed, recipe)
    return stages.train_rater(recipe, info, say, pretrained, run_dir, seed=seed, outer_steps=0)


def continuations(recipe: Recipe, info: DistInfo, say: stages.Say) -> tuple[list[Run], int]:
    """Stage (i), then per seed the raters the methods need (stage ii) and a continuation
    per method of ``select.methods`` (stage iii), each in its own folder under
    ``<output_dir>/select/<label>``. Returns the runs and the step they start from."""
    pretrained = stages.pretrain(recipe, info, say)
    origin = int(start_row(pretrained)["step"])
    needs = {stages.needed_rater(c) for c in recipe.select.methods.values()} - {None}
    runs: list[Run] = []
    for seed in recipe.continuation_seeds():
        start = seed_start(recipe, info, say, pretrained, seed)
        raters: dict[str, Path] = {}
        if "trained" in needs:
            raters["trained"] = seed_rater(recipe, info, say, pretrained, seed)
        if "untrained" in needs:
            raters["untrained"] = untrained_rater(recipe, info, say, pretrained, seed)
        for label, comp in recipe.select.methods.items():
            history = stages.continue_training(
                recipe, info, say, pretrained, method_dir(recipe, label, seed), stages.with_rater(comp, raters),
                recipe.select.steps, seed=seed,
            )
            runs.append(Run(label, seed, origin, start, history))
    return runs, origin


def run_folders(recipe: Recipe, runs: list[Run]) -> dict[str, dict[int, Path]]:
    """label -> seed -> the continuation's folder, in the runs' order."""
    folders: dict[str, dict[int, Path]] = {}
    for run in runs:
        folders.setdefault(run.label, {})[run.seed] = method_dir(recipe, run.label, run.seed)
    return folders


def method_dir(recipe: Recipe, label: str, seed: int) -> Path:
    """The continuation folder of method ``label`` for ``seed``."""
    return stages.seeded_dir(Path(recipe.output_dir) / "select" / label, seed, recipe)


def run_protocol(recipe: Recipe, info: DistInfo, say: stages.Say = print) -> dict:
    root = Path(recipe.output_dir)
    say = say if info.is_main else (lambda *_: None)
    runs, origin = continuations(recipe, info, say)
    reference = VANILLA if VANILLA in recipe.select.methods else None
    tables = tables_for(f"continuation from step {origin}", runs, reference)
    if info.is_main:
        paths = [*write_tables(tables, root, "comparison"), *write_noise_tables(
            run_folders(recipe, runs), root, "comparison", recipe.diffusion.num_timesteps, recipe.select.steps)]
        say("comparison: " + " ".join(str(p) for p in paths))
    barrier(info)
    metric = primary_metric([row for r in runs for row in r.history]) or "loss"
    table = next((t for t in tables if t.metric == metric), None)
    if table is None:
        return {}
    return {
        f"{r.label}/{metric}": sum(v.values()) / len(v)
        for r in table.rows if r.values for v in [r.values[max(r.values)]]
    }
