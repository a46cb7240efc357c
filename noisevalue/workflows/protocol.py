"""The paper's three-stage protocol as one workflow, with a comparison table at the end.

    <output_dir>/pretrain/          stage (i): diffusion training with i.i.d. noise
    <output_dir>/rater/             stage (ii): rater meta-training on the stage-(i) checkpoint
    <output_dir>/select/<method>/   stage (iii): continuation from stage (i) per selection method
    <output_dir>/comparison.{md,csv,png}

A stage whose folder holds a ``DONE`` marker is skipped; one with checkpoints but no marker
is resumed; every continuation starts from the same checkpoint with the same seed, so the
methods differ only in how each sample's noise is chosen.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from noisevalue.checkpoint import atomic_write_text, latest_checkpoint
from noisevalue.config import Recipe, parse_recipe
from noisevalue.distributed import DistInfo, barrier

DONE = "DONE"


def stage_recipe(recipe: Recipe, output_dir: Path, **updates: Any) -> Recipe:
    """A copy of ``recipe`` for one stage: dotted keys in ``updates`` replace values."""
    data = recipe.model_dump(mode="json")
    data["output_dir"] = str(output_dir)
    for dotted, value in updates.items():
        node = data
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return parse_recipe(data, f"recipe '{recipe.name}' ({output_dir.name} stage)")


def run_stage(recipe: Recipe, info: DistInfo, say: Any) -> dict:
    """Run (or skip, or resume) one stage; returns its final metrics."""
    from noisevalue.workflows import run_single

    run_dir = Path(recipe.output_dir)
    marker = run_dir / DONE
    if marker.is_file():
        say(f"stage {run_dir}: done already, skipped")
        return json.loads(marker.read_text()).get("metrics", {})
    resume = latest_checkpoint(run_dir / "checkpoints") is not None
    say(f"stage {run_dir}: {'resuming' if resume else 'starting'} ({recipe.workflow})")
    metrics = run_single(recipe, run_dir, info, resume=resume)
    if info.is_main:
        atomic_write_text(marker, json.dumps({"metrics": metrics}, indent=2))
    barrier(info)
    return metrics


def run_protocol(recipe: Recipe, info: DistInfo, say: Any = print) -> dict:
    root = Path(recipe.output_dir)
    cache = recipe.data.latent_cache or str(root / "latents")
    say = say if info.is_main else (lambda *_: None)

    pre = stage_recipe(recipe, root / "pretrain", workflow="pretrain", **{"data.latent_cache": cache})
    run_stage(pre, info, say)

    meta = stage_recipe(
        recipe, root / "rater", workflow="meta_train",
        **{"data.latent_cache": cache, "meta.pretrained": str(root / "pretrain")},
    )
    run_stage(meta, info, say)

    results: dict[str, list[dict]] = {}
    for label, comp in recipe.select.methods.items():
        selector = comp.model_dump(mode="json")
        if comp.name == "rater" and "checkpoint" not in selector["params"]:
            selector["params"]["checkpoint"] = str(root / "rater")
        stage = stage_recipe(
            recipe, root / "select" / label, workflow="pretrain",
            **{
                "data.latent_cache": cache,
                "train.steps": recipe.train.steps + recipe.select.steps,
                "train.init_from": str(root / "pretrain"),
                "train.selector": selector,
                "eval.every": recipe.select.eval_every,
            },
        )
        run_stage(stage, info, say)
        history = json.loads((root / "select" / label / "metrics.json").read_text())["history"]
        results[label] = [h for h in history if h["step"] > recipe.train.steps]
    start = json.loads((root / "pretrain" / "metrics.json").read_text())["history"][-1]
    if info.is_main:
        paths = write_comparison(root, results, start, recipe.train.steps)
        say(f"comparison: {paths[0]} {paths[1]} {paths[2]}")
    barrier(info)
    return {f"{label}/{k}": v for label, h in results.items() if h for k, v in h[-1].items() if k != "step"}


def primary_metric(row: dict) -> str | None:
    keys = [k for k in row if k != "step" and not k.startswith("baseline")]
    return keys[0] if keys else None


def comparison_rows(results: dict[str, list[dict]], start: dict, offset: int) -> tuple[str, list[int], dict]:
    """(metric name, continuation steps, {method: {step: value}})."""
    candidates = [primary_metric(start)] + [primary_metric(h[0]) for h in results.values() if h]
    metric = next((m for m in candidates if m), "loss")
    steps = sorted({h["step"] - offset for rows in results.values() for h in rows})
    table = {m: {h["step"] - offset: h.get(metric) for h in rows} for m, rows in results.items()}
    return metric, steps, table


def write_comparison(root: Path, results: dict[str, list[dict]], start: dict, offset: int) -> tuple[Path, Path, Path]:
    """Markdown + CSV (metric per method at each evaluation step, as the paper's Table 1)
    and a PNG plot of the metric against continuation steps."""
    metric, steps, table = comparison_rows(results, start, offset)
    base = start.get(metric)
    head = f"| method | start (step {offset}) | " + " | ".join(f"+{s}" for s in steps) + " |"
    lines = [
        f"{metric} (lower is better) after continuing from step {offset}",
        "",
        head,
        "|" + "---|" * (len(steps) + 2),
    ]
    for method, row in table.items():
        cells = [f"{row[s]:.3f}" if row.get(s) is not None else "-" for s in steps]
        lines.append(f"| {method} | {base:.3f} | " + " | ".join(cells) + " |" if base is not None else
                     f"| {method} | - | " + " | ".join(cells) + " |")
    md = root / "comparison.md"
    atomic_write_text(md, "\n".join(lines) + "\n")

    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["method", "step", metric])
    for method, row in table.items():
        writer.writerow([method, offset, base])
        for s in steps:
            writer.writerow([method, offset + s, row.get(s)])
    csv_path = root / "comparison.csv"
    atomic_write_text(csv_path, buf.getvalue())
    png = root / "comparison.png"
    plot_comparison(png, metric, offset, base, steps, table)
    return md, csv_path, png


def plot_comparison(path: Path, metric: str, offset: int, base: float | None, steps: list[int], table: dict) -> None:
    import os
    import tempfile

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for method, row in table.items():
        xs = ([offset] if base is not None else []) + [offset + s for s in steps if row.get(s) is not None]
        ys = ([base] if base is not None else []) + [row[s] for s in steps if row.get(s) is not None]
        ax.plot(xs, ys, marker="o", label=method)
    ax.set_xlabel("training step")
    ax.set_ylabel(metric)
    ax.set_title("continuation from the stage-(i) checkpoint")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".comparison.", suffix=".png")
    os.close(fd)
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
