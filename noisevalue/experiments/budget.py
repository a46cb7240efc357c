"""``noisevalue compare --budget``: every method against vanilla given the same compute.

The step-matched table gives every method ``select.steps`` steps. A method that costs more
per step (a rater's forward pass over k candidates, the oracle's forward-mode pass) would
buy vanilla more steps for the same compute. Here a method whose step costs r times
vanilla's is set against a vanilla continuation of ``round(r * select.steps)`` steps from
the same stage-(i) checkpoint and seed (``select/vanilla-<N>steps``), paired per seed:

* ``wall``: r from the measured step times, the median seconds per step over the log
  windows of every seed (the trainer's ``train/images_per_sec``), so that evaluations and
  checkpoints, which fall in a few windows, do not count. Machine-dependent.
* ``flops``: r from the floating-point operations of one training step at the recipe's
  global batch, counted by ``torch.utils.flop_counter.FlopCounterMode``: the backbone's
  forward and backward pass plus the selector's ``select`` (a rater's forward pass, the
  oracle's validation gradient and forward-mode pass). Machine-independent; element-wise
  work (norms, the noise draws) is not counted.

Writes ``compare_budget.md`` / ``.csv`` / ``.png``: per method and metric, the method's
value after its ``select.steps`` steps against vanilla's after N, shown at the same column.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue import registry
from noisevalue.config import STAGE_SETTINGS, Component, Recipe, method_kind
from noisevalue.diffusion import Diffusion
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.protocol import VANILLA, method_dir
from noisevalue.experiments.results import Run
from noisevalue.experiments.tables import tables_for, write_tables
from noisevalue.interfaces import TrainingContext
from noisevalue.train.run_log import TIMINGS as TIMINGS_LOG

BUDGETS = ("wall", "flops")
STEM = "compare_budget"


def step_seconds(recipe: Recipe, label: str) -> float | None:
    """A method's seconds per training step, the median over its seeds' log windows."""
    per_step = []
    for seed in recipe.continuation_seeds():
        path = method_dir(recipe, label, seed) / TIMINGS_LOG
        if path.is_file():
            for line in path.read_text().splitlines():
                ips = json.loads(line).get("train/images_per_sec")
                if ips:
                    per_step.append(recipe.train.global_batch_size / ips)
    return statistics.median(per_step) if per_step else None


def step_flops(recipe: Recipe, selector: Component, pretrained: Path) -> int:
    """The FLOPs of one training step at the global batch: the backbone's forward and
    backward pass on the chosen noise, plus ``selector``'s pick among its candidates, on
    random inputs of the stage-(i) checkpoint's shapes."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = ckpt.read_meta(ckpt.resolve_checkpoint(pretrained))
    assert meta.backbone is not None and meta.latent_shape is not None
    model = registry.build("backbone", registry.Named(meta.backbone.name, meta.backbone.params), where="model")
    chooser = registry.build("selector", selector, where="select.methods")
    diffusion = Diffusion.from_config(recipe.diffusion)
    n, shape = recipe.train.global_batch_size, tuple(meta.latent_shape)
    g = torch.Generator().manual_seed(0)
    x0, candidates = torch.randn(n, *shape, generator=g), torch.randn(n, chooser.k, *shape, generator=g)
    t = torch.randint(0, diffusion.num_timesteps, (n,), generator=g)
    y = torch.randint(0, meta.num_classes, (n,), generator=g) if meta.num_classes else None
    if chooser.needs_training_context:
        chooser.bind(TrainingContext(model=model, diffusion=diffusion,
                                     validation_batch=lambda m: (x0[:m], None if y is None else y[:m], t[:m],
                                                                 candidates[:m, 0])))
    with FlopCounterMode(display=False) as counter:
        if chooser.k > 1 or chooser.pool == "batch":
            with torch.no_grad():
                chooser.select(x0, y, t, candidates, generator=torch.Generator().manual_seed(0))
        diffusion.per_sample_loss(model, x0, t, y, candidates[:, 0]).mean().backward()
    return int(counter.get_total_flops())


def method_selector(recipe: Recipe, label: str) -> Component:
    """The selector a method's continuation (the recipe's seed) trained with, its rater
    checkpoint filled in; i.i.d. noise for a loss weighting or timestep sampler."""
    comp = recipe.select.methods[label]
    if method_kind(label, comp) != "selector":
        return Component(name="random", params={"k": 1})
    settings = json.loads((method_dir(recipe, label, recipe.seed) / STAGE_SETTINGS).read_text())
    return Component(name=settings["train.selector.name"], params=settings["train.selector.params"])


def budget_steps(recipe: Recipe, budget: str, labels: list[str]) -> dict[str, int]:
    """Per method (vanilla aside), the steps vanilla trains on the method's budget."""
    if budget == "wall":
        cost = {label: step_seconds(recipe, label) for label in labels}
        if not cost[VANILLA]:
            raise ConfigError("compare --budget wall: vanilla's continuations logged no step time "
                              f"({TIMINGS_LOG}): remove select/vanilla* to train them again")
    else:
        pretrained = Path(recipe.output_dir) / "pretrain"
        cost = {label: float(step_flops(recipe, method_selector(recipe, label), pretrained)) for label in labels}
    base = cost[VANILLA]
    assert base
    return {label: max(1, round(recipe.select.steps * c / base))
            for label, c in cost.items() if label != VANILLA and c is not None}


def budget_matched(recipe: Recipe, info: DistInfo, say: stages.Say, budget: str, runs: list[Run], origin: int,
                   labels: list[str]) -> list[Path]:
    """Each method against vanilla trained on the method's budget (see the module)."""
    steps = budget_steps(recipe, budget, labels)
    vanilla = recipe.select.methods[VANILLA]
    pretrained = Path(recipe.output_dir) / "pretrain"
    last = origin + recipe.select.steps
    tables = []
    for label, n in steps.items():
        ref = f"vanilla, {n} steps (the {budget} of {label}'s {recipe.select.steps})"
        paired: list[Run] = []
        for seed in recipe.continuation_seeds():
            run_dir = stages.seeded_dir(Path(recipe.output_dir) / "select" / f"{VANILLA}-{n}steps", seed, recipe)
            history = stages.continue_training(recipe, info, say, pretrained, run_dir, vanilla, n, seed=seed)
            # shown at the method's last step: both rows end on the same budget
            paired.append(Run(ref, seed, origin, None, [{**row, "step": last} for row in history
                                                        if row["step"] == origin + n]))
        paired += [Run(label, r.seed, origin, None, [h for h in r.history if h["step"] == last])
                   for r in runs if r.label == label]
        tables += tables_for(f"{label} against vanilla on the same {budget}", paired, ref)
    paths: list[Path] = []
    if info.is_main and tables:
        paths = list(write_tables(tables, Path(recipe.output_dir), STEM))
        say(f"compare --budget {budget}: " + " ".join(str(p) for p in paths))
    barrier(info)
    return paths
