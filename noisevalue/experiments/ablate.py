"""``noisevalue ablate``: the rater input ablation of the paper's Table 2.

Each variant removes some of the rater's inputs (timestep embedding, image stream, class
label; "noise only" removes all three) through the rater's ``use_<input>=False`` switches.
Every variant's rater is meta-trained on the same stage-(i) checkpoint with the same seed
and settings as the full rater, then used for the same stage-(iii) continuation; the table
has the full rater as its reference row, and vanilla training for context.

    <output_dir>/pretrain/, rater/, select/rater/, select/vanilla/   shared with the protocol
    <output_dir>/ablate/<variant>/rater/, .../select/                per variant
    <output_dir>/ablate/ablation.{md,csv,png}, ablation_curves.png
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from noisevalue import registry
from noisevalue.config import ABLATION_INPUTS, Component, Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.protocol import VANILLA, seed_rater, seed_start, start_row
from noisevalue.experiments.results import Run
from noisevalue.experiments.tables import tables_for, write_tables

FULL = "full rater"


def variant_label(removed: Sequence[str]) -> str:
    """The paper's row names: 'w/o timestep', 'w/o image, label', 'noise only'."""
    if set(removed) >= set(ABLATION_INPUTS):
        return "noise only"
    return "w/o " + ", ".join(i for i in ABLATION_INPUTS if i in removed)


def variant_dir(removed: Sequence[str]) -> str:
    if set(removed) >= set(ABLATION_INPUTS):
        return "noise-only"
    return "no-" + "-".join(i for i in ABLATION_INPUTS if i in removed)


def ablated_rater(rater: Component, removed: Sequence[str]) -> Component:
    """The recipe's rater with the ``use_<input>`` switch of each removed input off."""
    params = {**rater.params, **{f"use_{i}": False for i in removed}}
    registry.resolve("rater", Component(name=rater.name, params=params), f"rater ({rater.name} with the ablation switches)")
    return Component(name=rater.name, params=params)


def run_ablate(
    recipe: Recipe, info: DistInfo, say: stages.Say, variants: list[list[str]] | None = None
) -> list[Path]:
    if recipe.rater is None:
        raise ConfigError("rater: the ablation needs the recipe's rater section")
    chosen = recipe.ablate.variants if variants is None else variants
    if not chosen:
        raise ConfigError("ablate: no variant to run (pass --remove INPUT or --noise-only)")
    raters = {tuple(v): ablated_rater(recipe.rater, v) for v in chosen}  # fail before training
    root, out = Path(recipe.output_dir), Path(recipe.output_dir) / "ablate"
    selector = recipe.ablate.selector
    k = stages.candidates(selector)
    # the protocol's continuation with the same selector is the full-rater row (same run)
    shared = next((label for label, comp in recipe.select.methods.items() if comp == selector), None)
    full_base = root / "select" / shared if shared else out / "full" / "select"

    pretrained = stages.pretrain(recipe, info, say)
    origin = int(start_row(pretrained)["step"])
    labels = {FULL: f"{FULL} (k={k})", VANILLA: f"{VANILLA} (k=1)"}
    runs: list[Run] = []

    def add(label: str, seed: int, run_dir: Path, sel: Component) -> None:
        history = stages.continue_training(recipe, info, say, pretrained, run_dir, sel, recipe.select.steps, seed=seed)
        runs.append(Run(labels.get(label, label), seed, origin, starts[seed], history))

    starts: dict[int, dict] = {}
    for seed in recipe.continuation_seeds():
        starts[seed] = seed_start(recipe, info, say, pretrained, seed)
        full = seed_rater(recipe, info, say, pretrained, seed)
        add(FULL, seed, stages.seeded_dir(full_base, seed, recipe), stages.with_rater(selector, {"trained": full}))
        for removed, rater in raters.items():
            base = out / variant_dir(removed)
            rater_dir = seed_rater(recipe, info, say, pretrained, seed, rater=rater, base=base / "rater")
            add(variant_label(removed), seed, stages.seeded_dir(base / "select", seed, recipe),
                stages.with_rater(selector, {"trained": rater_dir}))
        vanilla = recipe.select.methods.get(VANILLA, Component(name="random", params={"k": 1}))
        add(VANILLA, seed, stages.seeded_dir(root / "select" / VANILLA, seed, recipe), vanilla)

    order = [labels[FULL], *(variant_label(v) for v in raters), labels[VANILLA]]
    runs.sort(key=lambda r: order.index(r.label))  # the paper's row order, whatever the seed loop
    tables = tables_for(f"rater input ablation, k={k}, from step {origin}", runs, reference=labels[FULL],
                        also_against=[labels[VANILLA]])
    paths: list[Path] = []
    if info.is_main:
        paths = list(write_tables(tables, out, "ablation"))
    barrier(info)
    return paths
