"""The paper's three-stage protocol as one workflow, with a comparison table at the end.

    <output_dir>/pretrain/          stage (i): diffusion training with i.i.d. noise
    <output_dir>/rater/             stage (ii): rater meta-training on the stage-(i) checkpoint
    <output_dir>/select/<method>/   stage (iii): continuation from stage (i) per selection method
    <output_dir>/comparison.{md,csv,png}

Every continuation starts from the same checkpoint with the same seed, so the methods differ
only in how each sample's noise is chosen. With ``select.seeds`` listing several seeds, stages
(ii) and (iii) run once per seed (folders ``<name>-seed<N>``) and the table reports the mean,
a 95% confidence interval and paired significance tests against vanilla training.
"""

from __future__ import annotations

from pathlib import Path

from noisevalue.config import Component, Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.workflows import stages
from noisevalue.workflows.tables import ResultTable, Row, write_table

VANILLA = "vanilla"


def primary_metric(row: dict) -> str | None:
    keys = [k for k in row if k != "step" and not k.startswith("baseline")]
    return keys[0] if keys else None


def start_row(run_dir: Path) -> dict:
    """The last evaluation of a run (the start of its continuations)."""
    return stages.evaluations(run_dir)[-1]


def seed_rater(recipe: Recipe, info: DistInfo, say: stages.Say, pretrained: Path, seed: int,
               rater: Component | None = None, base: Path | None = None, **updates: object) -> Path:
    """The rater for one seed (default folder ``<output_dir>/rater``, or ``-seed<N>``)."""
    base = base or Path(recipe.output_dir) / "rater"
    return stages.train_rater(recipe, info, say, pretrained, stages.seeded_dir(base, seed, recipe),
                              rater=rater, seed=seed, **updates)


def with_rater(selector: Component, rater_dir: Path) -> Component:
    """A ``rater`` selector without a checkpoint gets ``rater_dir``."""
    if selector.name != "rater" or "checkpoint" in selector.params:
        return selector
    return Component(name=selector.name, params={**selector.params, "checkpoint": str(rater_dir)})


def run_protocol(recipe: Recipe, info: DistInfo, say: stages.Say = print) -> dict:
    root = Path(recipe.output_dir)
    say = say if info.is_main else (lambda *_: None)
    pretrained = stages.pretrain(recipe, info, say)
    start = start_row(pretrained)
    metric = primary_metric(start) or "loss"
    origin = int(start["step"])
    rows = {label: Row(label, origin, start={}) for label in recipe.select.methods}
    needs_rater = any(c.name == "rater" and "checkpoint" not in c.params for c in recipe.select.methods.values())
    for seed in recipe.continuation_seeds():
        rater_dir = seed_rater(recipe, info, say, pretrained, seed) if needs_rater else None
        for label, comp in recipe.select.methods.items():
            selector = with_rater(comp, rater_dir) if rater_dir else comp
            run_dir = stages.seeded_dir(root / "select" / label, seed, recipe)
            history = stages.continue_training(
                recipe, info, say, pretrained, run_dir, selector, recipe.select.steps, seed=seed
            )
            if start.get(metric) is not None:
                rows[label].start[seed] = float(start[metric])
            rows[label].add(seed, history, metric)
    table = ResultTable(
        f"continuation from step {origin}", metric, list(rows.values()),
        reference=VANILLA if VANILLA in rows else None,
    )
    if info.is_main:
        paths = write_table(table, root, "comparison")
        say("comparison: " + " ".join(str(p) for p in paths))
    barrier(info)
    return {
        f"{r.label}/{metric}": sum(v.values()) / len(v)
        for r in table.rows if r.values for v in [r.values[max(r.values)]]
    }
