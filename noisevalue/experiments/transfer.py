"""``noisevalue transfer``: a frozen rater applied to larger backbones (paper Table 4, App. B.4).

    <output_dir>/pretrain/, rater/           the rater's source (the protocol's stages i, ii),
                                             unless ``--rater`` names another rater
    <output_dir>/transfer/<backbone>/pretrain/         the target's own pretraining
    <output_dir>/transfer/<backbone>/vanilla[-seedN]/  continuation, i.i.d. noise (k=1)
    <output_dir>/transfer/<backbone>/rater[-seedN]/    continuation, frozen rater (transfer.selector)
    <output_dir>/transfer/<backbone>/start-seed<N>/    the matched checkpoint scored with seed N's noise
    <output_dir>/transfer/transfer.{md,csv,png}        the Table 4 comparison (png: a forest plot)
    <output_dir>/transfer/transfer_curves.png          its metrics against steps
    <output_dir>/transfer/matching.{md,csv}            source level, matched step, checkpoint
    <output_dir>/transfer/loss_curves.png              the curves the matching read

Each target continues from the kept checkpoint nearest to the step where its smoothed
training loss comes down to the source's (see :mod:`noisevalue.experiments.matching`).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from noisevalue import checkpoint as ckpt
from noisevalue import registry
from noisevalue.config import Component, Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import CheckpointError, ConfigError
from noisevalue.experiments import matching, stages
from noisevalue.experiments.figures import plot, plot_curves, save_figure
from noisevalue.experiments.results import ResultTable, Run
from noisevalue.experiments.tables import csv_text, page_markdown, tables_for
from noisevalue.train.run_log import SCALARS, read_scalar

LOSS_TAG = "train/loss"
VANILLA, RATER = "vanilla", "rater"


@dataclass
class Curve:
    """A run's logged training loss and its smoothed version."""

    run_dir: Path
    steps: list[int]
    raw: list[float]
    smoothed: list[float]

    def at(self, step: int) -> float:
        """The smoothed loss at the logged step nearest to ``step`` (ties: the earlier)."""
        return self.smoothed[matching.nearest_index(self.steps, step)]


@dataclass
class Source:
    """The rater and the diffusion run (and step) it was meta-trained on."""

    rater: Path  # the rater checkpoint folder
    checkpoint: str  # the diffusion checkpoint it was trained on, as its meta.json names it
    step: int
    backbone: str  # its name, from the diffusion checkpoint's meta.json ('source' if gone)
    logged_step: int  # the logged step nearest to ``step``, where the level is read
    level: float  # the source's smoothed training loss there
    curve: Curve


@dataclass
class Match:
    """One target backbone: its curve, matched step and the checkpoint it continues from."""

    target: Component
    label: str
    folder: Path
    curve: Curve
    matched: int
    checkpoint: Path
    checkpoint_step: int


def run_transfer(
    recipe: Recipe, info: DistInfo, say: stages.Say, rater: str | None = None, targets: list[str] | None = None
) -> list[Path]:
    """The whole experiment; returns the paths of the tables and figures it wrote."""
    root = Path(recipe.output_dir)
    out = root / "transfer"
    cfg = recipe.transfer
    comps = target_components(recipe, targets)

    # 1-2. the rater, checked against the data before anything is trained
    if rater is not None:
        rater_ckpt = ckpt.resolve_checkpoint(rater)
        check_rater_fits(recipe, rater_ckpt, given=rater)
        source = find_source(rater_ckpt, cfg.smoothing_window, given=rater)
    else:
        if recipe.rater is None:
            raise ConfigError(
                "transfer needs a rater: pass --rater PATH (a trained rater) or give the recipe a 'rater' section"
            )
        pretrained = stages.pretrain(recipe, info, say)
        rater_dir = stages.train_rater(recipe, info, say, pretrained=pretrained, run_dir=root / "rater")
        rater_ckpt = ckpt.resolve_checkpoint(rater_dir)
        check_rater_fits(recipe, rater_ckpt, given=str(rater_dir))
        source = find_source(rater_ckpt, cfg.smoothing_window, given=str(rater_dir))
    say(f"transfer: rater {source.rater}, trained on {source.checkpoint} (step {source.step}); "
        f"source smoothed loss {source.level:.5g} at logged step {source.logged_step}")

    # 3. each target's pretraining and its matched checkpoint (all before any continuation)
    matches = [match_target(recipe, info, say, comp, out, source) for comp in comps]

    # 4. continuations from the matched checkpoints, without and with the frozen rater
    selectors = {
        VANILLA: Component(name="random", params={"k": 1}),
        RATER: stages.with_rater(cfg.selector, {"trained": source.rater}),
    }
    histories: dict[tuple[int, str, int], list[dict]] = {}
    starts: dict[tuple[int, int], dict | None] = {}
    for n, m in enumerate(matches):
        target_recipe = stages.replace(recipe, model=target_model(recipe, m.target))
        for seed in recipe.continuation_seeds():
            starts[n, seed] = seed_start(target_recipe, info, say, m, seed)
            for kind, selector in selectors.items():
                run_dir = stages.seeded_dir(m.folder / kind, seed, recipe)
                histories[n, kind, seed] = stages.continue_training(
                    target_recipe, info, say, m.checkpoint, run_dir, selector, recipe.select.steps, seed=seed,
                )

    # 5. tables and figures: per target, one table per metric (held-out loss first)
    tables: list[ResultTable] = []
    for n, m in enumerate(matches):
        base = f"{m.label} (from step {m.checkpoint_step})"
        labels = {VANILLA: base, RATER: f"{base} + rater (k={stages.candidates(cfg.selector)})"}
        runs = [Run(labels[kind], seed, m.checkpoint_step, starts[n, seed], histories[n, kind, seed])
                for kind in selectors for seed in recipe.continuation_seeds()]
        tables += tables_for(f"{m.label} with the frozen rater of {source.backbone} at step {source.step}",
                             runs, reference=base)
    paths: list[Path] = []
    if info.is_main:
        paths = write_outputs(out, recipe, source, matches, tables)
        say("transfer: " + " ".join(str(p) for p in paths))
    barrier(info)
    return paths


# ---------------------------------------------------------------------------- targets
def target_components(recipe: Recipe, names: list[str] | None) -> list[Component]:
    """``--to`` names (else ``transfer.targets``), checked against the registry, duplicates dropped."""
    from noisevalue import registry

    comps = [Component(name=n) for n in names] if names else list(recipe.transfer.targets)
    if not comps:
        raise ConfigError("transfer.targets: no target backbone (give one, or pass --to NAME)")
    for i, comp in enumerate(comps):
        where = "--to" if names else f"transfer.targets.{i}"
        registry.resolve("backbone", comp, where)
    unique: dict[str, Component] = {}
    for comp in comps:
        unique.setdefault(json.dumps(comp.model_dump(mode="json"), sort_keys=True), comp)
    return list(unique.values())


def target_model(recipe: Recipe, target: Component) -> Component:
    """The target backbone with the recipe's ``model.params`` it accepts (label dropout,
    learn_sigma, ...) unless it sets them itself: the larger model is trained like the source."""
    accepted = registry.accepted("backbone", target.name)
    inherited = {k: v for k, v in recipe.model.params.items() if k in accepted}
    return Component(name=target.name, params={**inherited, **target.params})


def target_label(target: Component) -> str:
    if not target.params:
        return target.name
    return target.name + " {" + ", ".join(f"{k}={v}" for k, v in sorted(target.params.items())) + "}"


def target_folder(target: Component) -> str:
    """A folder name for a target: ``DiT-B/2`` -> ``DiT-B_2``, plus a hash of its params."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", target.name)
    if target.params:
        name += "-" + hashlib.sha256(json.dumps(target.params, sort_keys=True).encode()).hexdigest()[:8]
    return name


# ---------------------------------------------------------------------------- the rater
def data_shape(recipe: Recipe) -> tuple[tuple[int, ...], int]:
    """(latent shape, class count) the recipe's data gives, without encoding anything."""

    dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    encoder = registry.build("encoder", recipe.data.encoder, where="data.encoder")
    shape = tuple(int(v) for v in encoder.latent_shape(dataset.channels, dataset.image_size))
    return shape, int(dataset.num_classes)


def check_rater_fits(recipe: Recipe, rater_ckpt: Path, given: str) -> None:
    """CheckpointError (one line) unless the rater reads the latents and labels of the
    recipe's data; also fails on anything that is not a loadable rater."""

    selector = registry.build("selector", Component(name="rater", params={"checkpoint": str(rater_ckpt)}),
                              where=f"rater '{given}'")
    shape, classes = data_shape(recipe)
    try:
        selector.check_compatible(shape, classes)
    except CheckpointError:
        r = selector.rater
        r_shape = getattr(r, "latent_shape", None)
        raise CheckpointError(
            f"rater '{rater_ckpt}' was trained for latents {tuple(r_shape) if r_shape else 'of any shape'} "
            f"with {getattr(r, 'num_classes', None)} classes, but recipe '{recipe.name}' trains its target "
            f"backbones on latents {shape} with {classes} classes: a rater transfers across backbones "
            "on the same data only"
        ) from None


def find_source(rater_ckpt: Path, smoothing_window: int, given: str) -> Source:
    """The diffusion run and step the rater was meta-trained on, and its loss level there."""
    pretrained = ckpt.read_meta(rater_ckpt).pretrained
    if not pretrained:
        raise CheckpointError(
            f"rater '{rater_ckpt}': its meta.json does not name the diffusion checkpoint it was "
            "trained on ('pretrained'), so there is no source loss level to match"
        )
    path = Path(str(pretrained))
    backbone = "source"
    if (path / ckpt.META).is_file():
        diffusion_meta = ckpt.read_meta(path)
        step = diffusion_meta.step
        backbone = diffusion_meta.backbone.name if diffusion_meta.backbone else backbone
    else:
        try:
            step = ckpt.checkpoint_step(path)
        except ValueError:
            raise CheckpointError(
                f"rater '{given}' was trained on '{path}', which is no longer there; "
                "transfer needs that run's training-loss log"
            ) from None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    if (path / SCALARS).is_file():  # a run folder rather than a checkpoint
        run_dir = path
    steps, raw = read_scalar(run_dir, LOSS_TAG)
    if not steps:
        raise ConfigError(
            f"rater '{given}' was trained on step {step} of '{run_dir}', which has no training-loss "
            f"log ({SCALARS} with '{LOSS_TAG}'); transfer matches loss levels on it, so it needs a "
            "rater trained on a noisevalue run (or that run's folder back in place)"
        )
    logged, level = matching.level_at(steps, raw, step, smoothing_window)
    curve = Curve(run_dir, steps, raw, matching.smooth(raw, smoothing_window))
    return Source(rater_ckpt, str(path), step, backbone, logged, level, curve)


# ---------------------------------------------------------------------------- matching
def match_target(recipe: Recipe, info: DistInfo, say: stages.Say, target: Component, out: Path,
                 source: Source) -> Match:
    """Pretrain ``target`` (or reuse it) and find its matched step and checkpoint."""
    cfg = recipe.transfer
    steps = cfg.pretrain_steps or recipe.train.steps
    folder = out / target_folder(target)
    run_dir = folder / "pretrain"
    label = target_label(target)
    target_recipe = stages.replace(
        recipe, model=target_model(recipe, target), train=stages.replace(recipe.train, steps=steps),
        # evaluated where it may be continued from, for the table's start column
        eval=stages.replace(recipe.eval, every=recipe.eval.every or recipe.train.keep_every),
    )
    extend_if_longer(target_recipe, info, say, run_dir)
    stages.pretrain(target_recipe, info, say, run_dir=run_dir)
    logged, raw = read_scalar(run_dir, LOSS_TAG)
    if not logged:
        raise ConfigError(f"'{run_dir}': no '{LOSS_TAG}' in its {SCALARS}; cannot match it to the source")
    curve = Curve(run_dir, logged, raw, matching.smooth(raw, cfg.smoothing_window))
    i = matching.matched_index(curve.smoothed, source.level, cfg.stability_window)
    if i is None:
        best = min(range(len(logged)), key=lambda j: curve.smoothed[j])
        raise ConfigError(
            f"transfer: {label} never stays at or below the source's smoothed loss {source.level:.5g} "
            f"for {cfg.stability_window} more logged point(s) within its {steps} pretraining steps (its "
            f"smoothed loss is at best {curve.smoothed[best]:.5g}, at step {logged[best]}); raise "
            f"transfer.pretrain_steps (now {steps}), or shorten transfer.stability_window"
        )
    matched = logged[i]
    kept = ckpt.list_checkpoints(run_dir / "checkpoints")
    chosen = matching.nearest_checkpoint([ckpt.checkpoint_step(p) for p in kept], matched)
    path = next(p for p in kept if ckpt.checkpoint_step(p) == chosen)
    say(f"transfer: {label} matches at step {matched} (smoothed loss {curve.smoothed[i]:.5g} <= "
        f"{source.level:.5g}); continuing from its checkpoint at step {chosen}")
    return Match(target, label, folder, curve, matched, path, chosen)


def extend_if_longer(recipe: Recipe, info: DistInfo, say: stages.Say, run_dir: Path) -> None:
    """A finished target pretraining asked now for more steps (``transfer.pretrain_steps``
    raised after a failed match), with every other setting the same, is resumed and trained
    on instead of refused; any other change still stops at the stage's settings check."""
    settings, done = run_dir / stages.STAGE_SETTINGS, run_dir / stages.DONE
    if not (settings.is_file() and done.is_file()):
        return
    stage = stages.stage_recipe(recipe, run_dir, workflow="pretrain")
    old, new = json.loads(settings.read_text()), stages.stage_settings(stage)
    changed = {k for k in old.keys() | new.keys() if old.get(k) != new.get(k)}
    if changed != {"train.steps"} or not old["train.steps"] < new["train.steps"]:
        return
    say(f"stage {run_dir}: extending from {old['train.steps']} to {new['train.steps']} steps")
    if info.is_main:
        ckpt.atomic_write_text(settings, json.dumps(new, indent=1, sort_keys=True))
        done.unlink()
    barrier(info)


def seed_start(target_recipe: Recipe, info: DistInfo, say: stages.Say, m: Match, seed: int) -> dict | None:
    """The start column of a target's continuations for ``seed``: the matched checkpoint
    scored with that seed's sample noise. For the recipe's own seed, the target pretraining's
    evaluation at that checkpoint (the same weights and seed), when it made one there; for
    another seed, a continuation of 0 steps (``<target>/start-seed<N>``)."""
    if seed == target_recipe.seed:
        return _pretraining_row(m.folder / "pretrain", m.checkpoint_step)
    return stages.scored_start(target_recipe, info, say, m.checkpoint, m.folder, seed)


# ---------------------------------------------------------------------------- outputs
def _pretraining_row(run_dir: Path, step: int) -> dict | None:
    """The target pretraining's evaluation at the chosen checkpoint, if it made one there."""
    if not (run_dir / "metrics.json").is_file():
        return None
    return next((row for row in stages.evaluations(run_dir) if row["step"] == step), None)


def matching_rows(recipe: Recipe, source: Source, matches: list[Match]) -> list[dict[str, Any]]:
    cfg = recipe.transfer
    return [
        {
            "backbone": m.label,
            "source_backbone": source.backbone,
            "source_run": str(source.curve.run_dir),
            "source_step": source.step,
            "source_logged_step": source.logged_step,
            "source_smoothed_loss": source.level,
            "matched_step": m.matched,
            "target_smoothed_loss_at_match": m.curve.at(m.matched),
            "checkpoint_step": m.checkpoint_step,
            "target_smoothed_loss_at_checkpoint": m.curve.at(m.checkpoint_step),
            "checkpoint": str(m.checkpoint),
            "smoothing_window": cfg.smoothing_window,
            "stability_window": cfg.stability_window,
            "log_every": recipe.train.log_every,
        }
        for m in matches
    ]


def write_outputs(out: Path, recipe: Recipe, source: Source, matches: list[Match],
                  tables: list[ResultTable]) -> list[Path]:
    cfg = recipe.transfer
    rows = matching_rows(recipe, source, matches)

    match_csv = out / "matching.csv"
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    ckpt.atomic_write_text(match_csv, buf.getvalue())

    rule = (
        f"Matched step: the first logged step t whose training loss, smoothed with a centred rolling mean "
        f"of {cfg.smoothing_window} logged points, stays <= the source's smoothed loss at every logged "
        f"point of [t, t + {cfg.stability_window} points] (train.log_every={recipe.train.log_every}); "
        "each target continues from its kept checkpoint nearest to t (ties: the earlier)."
    )
    lines = [
        "# Loss-matched checkpoints (appendix B.4)", "",
        f"Rater: `{source.rater}`, trained on `{source.checkpoint}` ({source.backbone}, step {source.step}); "
        f"source smoothed training loss {source.level:.5g} (logged step {source.logged_step}).", "", rule, "",
        "| backbone | source step | source smoothed loss | matched step | smoothed loss there | "
        "checkpoint | smoothed loss there |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['backbone']} | {r['source_step']} | {r['source_smoothed_loss']:.5g} | {r['matched_step']} | "
            f"{r['target_smoothed_loss_at_match']:.5g} | {r['checkpoint_step']} | "
            f"{r['target_smoothed_loss_at_checkpoint']:.5g} |"
        )
    match_md = out / "matching.md"
    ckpt.atomic_write_text(match_md, "\n".join(lines) + "\n")

    md = out / "transfer.md"
    head = [
        "# A frozen rater on larger backbones (paper Table 4)", "",
        f"Rater `{source.rater}` (frozen, k={stages.candidates(cfg.selector)}), trained on {source.backbone} at step {source.step} "
        f"(`{source.curve.run_dir}`); "
        f"each backbone continues for {recipe.select.steps} steps from its loss-matched checkpoint "
        "(matching.md), without and with the rater. Each backbone's rows are tested against its own "
        "run without the rater.", "",
    ]
    ckpt.atomic_write_text(md, page_markdown(tables, "\n".join(head) + "\n"))

    csv_path = out / "transfer.csv"
    ckpt.atomic_write_text(csv_path, csv_text(tables))

    png, table_curves = out / "transfer.png", out / "transfer_curves.png"
    plot(tables, png)
    plot_curves(tables, table_curves)

    curves = out / "loss_curves.png"
    plot_loss_curves(curves, source, matches, cfg.stability_window)
    return [md, csv_path, png, table_curves, match_md, match_csv, curves]


def plot_loss_curves(path: Path, source: Source, matches: list[Match], stability_window: int) -> None:
    """Raw (faint) and smoothed training loss of the source and every target, the source
    level as a horizontal line, matched steps (with their stability windows) and the chosen
    checkpoints marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    curves = [(f"{source.backbone} (source)", source.curve)] + [(m.label, m.curve) for m in matches]
    for n, (label, curve) in enumerate(curves):
        color = colors[n % len(colors)]
        ax.plot(curve.steps, curve.raw, color=color, alpha=0.25, linewidth=0.8)
        ax.plot(curve.steps, curve.smoothed, color=color, linewidth=1.6, label=f"{label} (smoothed)")
    ax.axhline(source.level, color="black", linestyle="--", linewidth=1,
               label=f"source level {source.level:.4g}")
    ax.plot([source.logged_step], [source.level], marker="*", markersize=12, color=colors[0], linestyle="none",
            label=f"rater's source, step {source.step}")
    for n, m in enumerate(matches, start=1):
        color = colors[n % len(colors)]
        i = m.curve.steps.index(m.matched)
        end = m.curve.steps[min(i + stability_window, len(m.curve.steps) - 1)]
        ax.axvspan(m.matched, end, color=color, alpha=0.08)
        ax.plot([m.matched], [m.curve.smoothed[i]], marker="o", color=color, linestyle="none",
                label=f"{m.label}: matched at {m.matched}")
        ax.plot([m.checkpoint_step], [m.curve.at(m.checkpoint_step)], marker="D", markerfacecolor="none",
                color=color, linestyle="none", label=f"{m.label}: checkpoint {m.checkpoint_step}")
    if all(v > 0 for _, c in curves for v in c.raw):
        ax.set_yscale("log")
    ax.set_xlabel("training step")
    ax.set_ylabel(LOSS_TAG)
    ax.set_title("training loss: source and targets (appendix B.4 matching)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)
