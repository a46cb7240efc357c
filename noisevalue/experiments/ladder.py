"""``noisevalue ladder``: does a selection method help one optimizer step, a few, or many?

From the protocol's one stage-(i) checkpoint (``<output_dir>/pretrain``) every method of
``ladder.methods`` takes ``max(ladder.horizons)`` training steps with each optimizer of
``ladder.optimizers``, for each seed of ``ladder.seeds``; the held-out loss of the raw
weights is scored after each horizon H, and that of the EMA weights after the last. The
steps are the trainer's own (:meth:`DiffusionTraining.train_step`): seed s draws the same
data, timesteps and candidate pool at step t for every method and optimizer, and vanilla
(``random`` with k=1) trains on candidate 0 of that pool. The raters (``rater``,
``random_rater``) are the protocol's stage-(ii) folders of each seed, reused when there.

Optimizers: ``sgd`` is plain SGD (no momentum or weight decay), the step the rater's inner
loop and the oracle's alignment assume; ``adamw`` continues the checkpoint's saved AdamW
state with its own ``lr``. The held-out loss is the trainer's (``eval.loss_draws`` fixed
draws of the held-out set), so differences between methods carry no evaluation noise.

    <output_dir>/ladder/cells/<optimizer>/<method>/seed<N>.json   one run: loss per H
    <output_dir>/ladder/ladder.md    per optimizer x H: paired difference from vanilla
    <output_dir>/ladder/ladder.csv   one line per (optimizer, method, seed, H)
    <output_dir>/ladder/ladder.png   per optimizer: the differences against H

Two shortcuts that change no number: the checkpoint's held-out loss (H = 0) is scored once
per process, and under plain SGD ``oracle_precond`` is ``oracle`` (:func:`same_run`), so its
cell is written as a copy of the oracle's (marked ``same_as``).

A finished cell is reused (its JSON records the settings it ran with; other settings stop
the command); an interrupted one is run again from the checkpoint, so a resume loses at
most one cell. Tables and figure are rebuilt from the cells: a rerun writes the same bytes.
How to read the outcomes: docs/ladder.md.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from pathlib import Path
from typing import Any

import torch

from noisevalue import checkpoint as ckpt
from noisevalue.config import Component, LadderOptimizer, Recipe, method_kind, trial_build
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.figures import save_figure
from noisevalue.experiments.paired import holm, mean_ci, paired_difference
from noisevalue.train.diffusion_training import DiffusionTraining

LADDER_DIR = "ladder"
CELLS = "cells"
REFERENCE = "vanilla"
STEM = "ladder"
HELDOUT = "heldout_loss"


def check_ladder(recipe: Recipe) -> None:
    """The ladder's settings beyond the schema: every method a selector that builds, a rater
    section for those that need one, a held-out loss to score. Before anything is created."""
    for label, comp in recipe.ladder.methods.items():
        where = f"ladder.methods.{label}"
        kind = method_kind(where, comp)
        if kind != "selector":
            raise ConfigError(f"{where}.name: '{comp.name}' is a {kind.replace('_', ' ')}; "
                              "the ladder compares how the noise is chosen (selectors)")
        trial_build(where, kind, comp)
        if stages.needed_rater(comp) is not None and recipe.rater is None:
            raise ConfigError(f"{where}: '{comp.name}' needs a rater; the recipe has no 'rater' section")
    if not recipe.eval.loss_draws:
        raise ConfigError("eval.loss_draws: 0 turns the held-out loss off; the ladder scores it (set it > 0)")


def cell_path(root: Path, optimizer: str, method: str, seed: int) -> Path:
    return root / CELLS / optimizer / method / f"seed{seed}.json"


def run_ladder(recipe: Recipe, info: DistInfo, say: stages.Say) -> list[Path]:
    from noisevalue.experiments.protocol import seed_rater, untrained_rater
    from noisevalue.train.progress import StepProgress

    check_ladder(recipe)
    lad = recipe.ladder
    root = Path(recipe.output_dir) / LADDER_DIR
    pretrained = stages.pretrain(recipe, info, say)
    origin = ckpt.read_meta(ckpt.resolve_checkpoint(pretrained)).step
    needs = {stages.needed_rater(c) for c in lad.methods.values()} - {None}
    total = len(lad.seeds) * len(lad.optimizers) * len(lad.methods)
    say(f"ladder: {len(lad.methods)} methods x {len(lad.optimizers)} optimizers x {len(lad.seeds)} seeds, "
        f"{max(lad.horizons)} steps each from step {origin}; held-out loss after {lad.horizons} steps")
    todo, copies = [], []
    for seed in lad.seeds:  # the raters first: each is a stage of every process
        raters: dict[str, Path] = {}
        if "trained" in needs:
            raters["trained"] = seed_rater(recipe, info, say, pretrained, seed)
        if "untrained" in needs:
            raters["untrained"] = untrained_rater(recipe, info, say, pretrained, seed)
        for opt_label, opt in lad.optimizers.items():
            for label, comp in lad.methods.items():
                path = cell_path(root, opt_label, label, seed)
                cell = cell_recipe(recipe, pretrained, stages.with_rater(comp, raters), opt, seed, path.parent)
                settings = cell_settings(cell, opt, lad.horizons)
                if reusable(path, settings, stages.default_settings(cell)):
                    continue
                twin = same_run(lad.methods, label, opt)
                if twin is None:
                    todo.append((path, cell, opt, settings, f"{opt_label} {label} seed {seed}"))
                else:
                    copies.append((path, cell_path(root, opt_label, twin, seed), twin, settings))
    barrier(info)  # every process listed the same cells before any is written
    # the cells are independent runs of one process: dealt out round-robin to the processes
    mine = todo[info.rank::info.world_size]
    alone = DistInfo(device=info.device)
    say(f"ladder: {total - len(todo) - len(copies)} of {total} cells done before; {len(todo)} to run"
        + (f", {len(mine)} here and the rest on {info.world_size - 1} more processes" if info.distributed else "")
        + (f"; {len(copies)} copied from the cell that is theirs by construction" if copies else ""))
    start = None  # the checkpoint's held-out loss (H = 0): the same for every cell, scored once
    with StepProgress("ladder cells", len(mine), enabled=info.is_main, print_every=1) as bar:
        for path, cell, opt, settings, name in mine:
            result = run_cell(cell, alone, opt, lad.horizons, start)
            start = result["raw"]["0"]
            ckpt.atomic_write_text(path, json.dumps({**result, "settings": settings}, indent=1, sort_keys=True))
            last = result["raw"][str(max(lad.horizons))]
            say(f"ladder: {name}: held-out loss {last:.6g} after {max(lad.horizons)} steps ({result['wall_s']:.0f} s)")
            bar.advance()
    barrier(info)
    if info.is_main:  # the cells that are another's by construction, once that one is written
        for path, twin_path, twin, settings in copies:
            twin_cell = json.loads(twin_path.read_text())
            copy = {**twin_cell, "same_as": twin, "settings": settings, "wall_s": 0.0}  # nothing ran
            ckpt.atomic_write_text(path, json.dumps(copy, indent=1, sort_keys=True))
    barrier(info)
    paths = [root / f"{STEM}.{ext}" for ext in ("md", "csv", "png")]
    if info.is_main:
        cells = load_cells(root, recipe)
        ckpt.atomic_write_text(paths[0], markdown(recipe, cells, origin))
        ckpt.atomic_write_text(paths[1], csv_text(recipe, cells))
        plot(recipe, cells, paths[2])
        say("ladder: " + " ".join(str(p) for p in paths))
    barrier(info)
    return paths


# ------------------------------------------------------------------------------ a cell
def cell_recipe(recipe: Recipe, pretrained: Path, method: Component, opt: LadderOptimizer, seed: int,
                run_dir: Path) -> Recipe:
    """The continuation recipe of one cell: ``method`` choosing the noise, from the stage-(i)
    checkpoint, with ``seed``'s draws; the held-out loss is its only evaluation."""
    origin = ckpt.read_meta(ckpt.resolve_checkpoint(pretrained)).step
    train = stages.replace(recipe.train, steps=origin + max(recipe.ladder.horizons), init_from=str(pretrained),
                           selector=method, lr=opt.lr)
    return stages.replace(
        stages.stage_recipe(recipe, run_dir, workflow="pretrain", seed=seed),
        train=train, eval=stages.replace(recipe.eval, evaluators=[], every=None, baselines=False),
    )


def cell_settings(cell: Recipe, opt: LadderOptimizer, horizons: list[int]) -> dict[str, Any]:
    """What decides a cell's numbers: its continuation's result-relevant settings (those a
    stage records), the optimizer and the horizons."""
    return {**stages.stage_settings(cell), "ladder.optimizer": opt.model_dump(mode="json"),
            "ladder.horizons": list(horizons)}


def reusable(path: Path, settings: dict[str, Any], defaults: dict[str, Any] | None = None) -> bool:
    """True when the cell is done with these settings; other settings stop the command. A
    setting added to noisevalue after the cell ran counts at its value in ``defaults``."""
    if not path.is_file():
        return False
    old = json.loads(path.read_text()).get("settings", {})
    changed = stages.differing(old, settings, defaults)
    if changed:
        k = changed[0]
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        raise ConfigError(f"ladder cell '{path}' ran with {k}={old.get(k)!r}, the recipe now says "
                          f"{settings.get(k)!r}{more}; remove the folder '{path.parents[2]}' to rerun the ladder, "
                          "or set output_dir=... for a new run")
    return True


def same_run(methods: dict[str, Component], label: str, opt: LadderOptimizer) -> str | None:
    """The method whose cell is ``label``'s by construction under ``opt``, or None: under
    plain SGD the preconditioned oracle's metric is the identity, so ``oracle_precond`` picks
    what ``oracle`` with the same parameters picks (tested in the selectors' tests) and its
    cell is a copy of that one."""
    comp = methods[label]
    if opt.name != "sgd" or comp.name != "oracle_precond":
        return None
    return next((other for other, c in methods.items() if c.name == "oracle" and c.params == comp.params), None)


class _Steps(DiffusionTraining):
    """The trainer, set up from the checkpoint, whose steps the ladder takes one by one; it
    writes nothing (no log, no checkpoint)."""

    def open_log(self) -> None:
        pass


def run_cell(cell: Recipe, info: DistInfo, opt: LadderOptimizer, horizons: list[int],
             start: float | None = None) -> dict[str, Any]:
    """One cell's steps: the raw weights' held-out loss at 0 and each horizon, the EMA's at
    the last, the steps not applied (non-finite) and the wall time. ``start``: the
    checkpoint's held-out loss when already scored (every cell starts from it)."""
    from noisevalue.ema import unwrap

    clock = time.perf_counter()
    trainer = _Steps(cell, Path(cell.output_dir), info)
    try:
        trainer.setup()
        model = unwrap(trainer.model)
        if opt.name == "sgd":  # the checkpoint's AdamW state is not used
            trainer.set_optimizer(torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                  lr=opt.lr, momentum=0.0, weight_decay=0.0))
        origin = trainer.step
        raw = {"0": heldout(trainer, model) if start is None else start}
        for h in range(1, max(horizons) + 1):
            trainer.train_step(origin + h - 1)
            trainer.step = origin + h
            if h in horizons:
                raw[str(h)] = heldout(trainer, model)
        # the steps the trainer did not apply (non-finite), counted on the device as its loop does
        skipped = int(trainer._bad_steps)
        result = {"raw": raw, "ema": heldout(trainer, ema_weights(trainer)), "skipped_steps": skipped}
    finally:
        trainer.cleanup()
    return {**result, "wall_s": time.perf_counter() - clock}


def ema_weights(trainer: DiffusionTraining) -> torch.nn.Module:
    """A copy of the model holding the EMA weights (whatever ``sample.use_ema`` says)."""
    import copy

    from noisevalue.ema import unwrap

    model = copy.deepcopy(unwrap(trainer.model))
    model.load_state_dict(trainer.ema.state_dict())
    return model.eval()


def heldout(trainer: DiffusionTraining, model: torch.nn.Module) -> float:
    """The trainer's held-out loss of ``model``, scored in eval mode."""
    assert trainer.evaluation.heldout is not None  # check_ladder: eval.loss_draws > 0
    was_training = model.training
    model.eval()
    try:
        return trainer.evaluation.heldout(model, trainer.diffusion)
    finally:
        model.train(was_training)


# ---------------------------------------------------------------------------- outputs
Cells = dict[tuple[str, str], dict[int, dict[str, Any]]]  # (optimizer, method) -> seed -> cell


def load_cells(root: Path, recipe: Recipe) -> Cells:
    lad = recipe.ladder
    return {(o, m): {s: json.loads(cell_path(root, o, m, s).read_text()) for s in lad.seeds}
            for o in lad.optimizers for m in lad.methods}


def columns(recipe: Recipe) -> list[tuple[str, str, int]]:
    """(header, weights, H) of the tables' columns: the raw weights at each horizon, then
    the EMA at the last."""
    hs = recipe.ladder.horizons
    return [(f"+{h}", "raw", h) for h in hs] + [(f"EMA +{hs[-1]}", "ema", hs[-1])]


def value(cell: dict[str, Any], weights: str, h: int) -> float:
    return float(cell["ema"]) if weights == "ema" else float(cell["raw"][str(h)])


def _g(x: float) -> str:
    return f"{x:.5g}"


def _d(x: float) -> str:
    """A difference: signed, three significant digits."""
    return f"{x:+.3g}"


def markdown(recipe: Recipe, cells: Cells, origin: int) -> str:
    lad = recipe.ladder
    cols = columns(recipe)
    methods = [label for label in lad.methods if label != REFERENCE]
    pairs = [(label, REFERENCE) for label in methods] + list(lad.also_against.items())
    # every paired test of the page first: Holm's correction is over all of them
    tests = {(o, label, ref, i): paired_difference({s: value(c, w, h) for s, c in cells[(o, ref)].items()},
                                                    {s: value(c, w, h) for s, c in cells[(o, label)].items()})
             for o in lad.optimizers for label, ref in pairs for i, (_, w, h) in enumerate(cols)}
    keys = [k for k, d in tests.items() if d is not None]
    adjusted = dict(zip(keys, holm([tests[k].p for k in keys]), strict=True))  # type: ignore[union-attr]
    more = len(lad.also_against)
    family = f"{len(lad.optimizers)} optimizers x ({len(methods)} methods" + (
        f" + {more} difference{'s' if more > 1 else ''} between methods" if more else "") + f") x {len(cols)} columns"
    lines = [
        f"# Ladder: continuations of the stage-(i) checkpoint (step {origin})", "",
        f"Seeds {lad.seeds}. Held-out loss ({recipe.eval.loss_draws} fixed draws per held-out image) of the "
        "raw weights after H steps, and of the EMA after the last. Rows: the paired difference from vanilla "
        "(method minus vanilla, per seed; negative is better): mean [95% interval], p (paired t-test) and, "
        f"in brackets, p adjusted by Holm over the {len(keys)} paired tests of this page ({family}); bold: "
        "Holm's p < 0.05. Vanilla's row: its loss, mean ± half-width of the 95% interval.", "",
    ]

    def row(opt_label: str, label: str, ref: str) -> str:
        out = []
        for i in range(len(cols)):
            d = tests[(opt_label, label, ref, i)]
            if d is None:
                out.append("-")
                continue
            p_holm = adjusted[(opt_label, label, ref, i)]
            text = f"{_d(d.mean)} [{_d(d.low)}, {_d(d.high)}] p {d.p:.2g} ({p_holm:.2g})"
            out.append(f"**{text}**" if p_holm < 0.05 else text)
        return " | ".join(out)

    header = " | ".join(c[0] for c in cols) + " |"
    for opt_label, opt in lad.optimizers.items():
        ref_cells = cells[(opt_label, REFERENCE)]
        lines += [f"## {opt_label}: {opt.name}, lr {opt.lr:g}", "", "| method | " + header,
                  "|---" * (len(cols) + 1) + "|"]
        loss = []
        for _, weights, h in cols:
            mean, half = mean_ci([value(c, weights, h) for c in ref_cells.values()])
            loss.append(_g(mean) if math.isnan(half) else f"{_g(mean)} ± {half:.2g}")
        start = mean_ci([float(c["raw"]["0"]) for c in ref_cells.values()])[0]
        lines.append(f"| {REFERENCE} (loss; start {_g(start)}) | " + " | ".join(loss) + " |")
        lines += [f"| {label} | {row(opt_label, label, REFERENCE)} |" for label in methods]
        if lad.also_against:
            lines += ["", "| difference between methods | " + header, "|---" * (len(cols) + 1) + "|"]
            lines += [f"| {label} minus {other} | {row(opt_label, label, other)} |"
                      for label, other in lad.also_against.items()]
        twins = sorted({(label, c["same_as"]) for (o, label), by in cells.items() if o == opt_label
                        for c in by.values() if "same_as" in c})
        if twins:
            lines += [""] + [f"{label}: the cells of {twin} (the same picks by construction under {opt.name})."
                             for label, twin in twins]
        skipped = sum(c.get("skipped_steps", 0) for (o, _), by in cells.items() if o == opt_label for c in by.values())
        if skipped:
            lines += ["", f"{skipped} step(s) with a non-finite loss or gradient were not applied."]
        lines.append("")
    return "\n".join(lines)


def csv_text(recipe: Recipe, cells: Cells) -> str:
    """One line per (optimizer, method, seed, H): the raw weights' held-out loss, vanilla's
    for the same seed and H, and the EMA's at the last H."""
    out = io.StringIO()
    w = csv.writer(out, lineterminator="\n")
    w.writerow(["optimizer", "method", "seed", "steps", HELDOUT, "vanilla_" + HELDOUT, "ema_" + HELDOUT])
    last = recipe.ladder.horizons[-1]
    for (opt_label, label), by_seed in cells.items():
        for seed, cell in by_seed.items():
            for h in recipe.ladder.horizons:
                ref = cells[(opt_label, REFERENCE)][seed]
                w.writerow([opt_label, label, seed, h, repr(value(cell, "raw", h)), repr(value(ref, "raw", h)),
                            repr(float(cell["ema"])) if h == last else ""])
    return out.getvalue()


def plot(recipe: Recipe, cells: Cells, path: Path) -> None:
    """Per optimizer: the paired difference from vanilla (raw weights) against H, with its
    95% interval, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lad = recipe.ladder
    n = len(lad.optimizers)
    fig, axes = plt.subplots(1, n, figsize=(5.5 * n, 4), dpi=110, squeeze=False)
    for ax, opt_label in zip(axes.flat, lad.optimizers, strict=True):
        ref = cells[(opt_label, REFERENCE)]
        for label in lad.methods:
            if label == REFERENCE:
                continue
            xs, ys, lo, hi = [], [], [], []
            for h in lad.horizons:
                d = paired_difference({s: value(c, "raw", h) for s, c in ref.items()},
                                      {s: value(c, "raw", h) for s, c in cells[(opt_label, label)].items()})
                if d is not None:
                    xs.append(h)
                    ys.append(d.mean)
                    lo.append(d.mean - d.low)
                    hi.append(d.high - d.mean)
            ax.errorbar(xs, ys, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("steps H from the stage-(i) checkpoint")
        ax.set_ylabel("held-out loss minus vanilla's")
        ax.set_title(f"{opt_label} ({len(lad.seeds)} seeds, 95% intervals)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
