"""``noisevalue sample``, ``noisevalue eval`` and ``noisevalue export`` (registered on the app in
:mod:`noisevalue.cli`).

The work is done by :mod:`noisevalue.sampling.sample` and
:mod:`noisevalue.sampling.score`; torch is imported inside the commands only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from noisevalue.cli_options import (
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    RdzvIdOpt,
    RdzvOpt,
    launch_settings,
    single_process,
    user_errors,
    world_size,
)

RunArg = typer.Argument(
    ..., metavar="RUN_OR_CHECKPOINT",
    help="A run folder, its checkpoints/ folder or a step_XXXXXXX checkpoint folder; or DiT weights from elsewhere "
    "(an official .pt file, a diffusers folder) with --recipe.",
)
RecipeOpt = typer.Option(
    None, "--recipe",
    help="The recipe the run was trained with (default: recipe.yaml of the run or the nearest folder above).",
)
NumOpt = typer.Option(None, "--num", help="Number of samples (default: the recipe's eval.num_samples).")
CfgOpt = typer.Option(None, "--cfg-scale", help="Classifier-free guidance scale (default: sample.cfg_scale).")
NagOpt = typer.Option(
    None, "--nag-scale", help="Noise Awareness Guidance scale (default: sample.nag_scale; a NAG backbone)."
)
StepsOpt = typer.Option(None, "--steps", help="Sampling steps (default: sample.num_steps).")
SamplerOpt = typer.Option(
    None, "--sampler", help="ddim, or ddpm (with the learned variance when the model has one; default: sample.sampler)."
)
EtaOpt = typer.Option(None, "--eta", help="DDIM eta; 0 is deterministic (default: sample.eta).")
SeedOpt = typer.Option(None, "--seed", help="Sampling seed (default: the run's seed).")
ClassOpt = typer.Option(None, "--class", help="Draw every sample of this class (default: sample i gets class i % classes).")
NoEmaOpt = typer.Option(False, "--no-ema", help="Use the raw weights instead of the EMA weights.")
OutOpt = typer.Option(
    None, "--out", help="Output folder (default: <run>/samples/step_XXXXXXX-<settings>/)."
)
BatchOpt = typer.Option(None, "--batch-size", help="Images per model batch and per shard (default: sample.batch_size).")
DeviceOpt = typer.Option(None, "--device", help="auto, cpu or cuda (default: the recipe's train.device).")


def sample(
    run: str = RunArg,
    num: int | None = NumOpt,
    cfg_scale: float | None = CfgOpt,
    nag_scale: float | None = NagOpt,
    steps: int | None = StepsOpt,
    sampler: str | None = SamplerOpt,
    eta: float | None = EtaOpt,
    seed: int | None = SeedOpt,
    class_label: int | None = ClassOpt,
    no_ema: bool = NoEmaOpt,
    out: Path | None = OutOpt,
    batch_size: int | None = BatchOpt,
    recipe: str | None = RecipeOpt,
    device: str | None = DeviceOpt,
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """DDIM samples of a run or checkpoint (EMA weights by default) as samples.npz in the
    ADM format (arr_0 uint8 NHWC, arr_1 labels) plus grid.png. Resumable; the images do not
    depend on the number of processes."""

    with user_errors():
        from noisevalue.sampling import sample as sp

        ctx = sp.resolve_run(run, recipe)
        settings = sp.sample_settings(
            ctx, num=num, cfg_scale=cfg_scale, nag_scale=nag_scale, steps=steps, eta=eta, seed=seed,
            use_ema=not no_ema, class_label=class_label, batch_size=batch_size, device=device, sampler=sampler,
        )
        folder = Path(out) if out is not None else sp.default_out_dir(ctx, settings)
        launch = launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id)
        _draw(sp, ctx, settings, folder, batch_size is not None, launch)


def _draw(sp: Any, ctx: Any, settings: Any, folder: Path, batch_size_given: bool, launch: dict) -> Path:
    """Sample into ``folder`` here or under torch.distributed.run; print where the files are."""
    from noisevalue import distributed

    sp.check_sampling(settings, folder, launch["nproc_per_node"])
    settings = sp.prepare_out_dir(folder, settings, batch_size_given)
    npz, grid = folder / sp.SAMPLES_FILE, folder / sp.GRID_FILE
    world = world_size(launch)
    typer.echo(
        f"noisevalue sample: {ctx.checkpoint} ({'EMA' if settings.use_ema else 'raw'} weights, "
        f"recipe {ctx.recipe_source}) -> {folder}  ({settings.num} images, {settings.num_steps} {settings.sampler.upper()} "
        f"steps, eta {settings.eta:g}, cfg {settings.cfg_scale:g}"
        f"{f', nag {settings.nag_scale:g}' if settings.nag_scale else ''}, seed {settings.seed}, processes {world})"
    )
    if npz.is_file():
        typer.echo(f"complete already, reused: {npz}")
    elif single_process(launch):
        info = distributed.init(settings.device)
        sp.run_sampling(folder, info, say=typer.echo)
    else:
        from noisevalue import jobs

        args = jobs.launcher_args("sample", folder, **launch)
        typer.echo("torch.distributed.run " + " ".join(args))
        distributed.launch(args)
    typer.echo(f"samples: {npz}")
    if grid.is_file():
        typer.echo(f"grid: {grid}")
    return npz


def export_model(
    run: str = RunArg,
    out: Path = typer.Argument(..., metavar="OUT", help="The folder (diffusers) or .pt file (dit) to write."),
    fmt: str = typer.Option("diffusers", "--format", help="diffusers: a DiTPipeline folder; dit: the official "
                            "layout's state dict."),
    no_ema: bool = NoEmaOpt,
    recipe: str | None = RecipeOpt,
) -> None:
    """A run's model (EMA weights by default) for other tools: a diffusers DiTPipeline folder
    with the run's VAE and sampler, or a state dict in the official DiT layout."""
    with user_errors():
        from noisevalue.sampling import export as ex
        from noisevalue.sampling import sample as sp

        ctx = sp.resolve_run(run, recipe)
        settings = sp.sample_settings(ctx, use_ema=not no_ema)
        typer.echo(ex.export(settings, Path(out), fmt, ctx.recipe))


def evaluate(
    samples: str = typer.Argument(
        ..., metavar="RUN_OR_NPZ", help="A samples .npz (uint8 arr_0, NHWC), or a run/checkpoint folder or DiT weights "
        "from elsewhere with --recipe (sampled first)."
    ),
    reference: str | None = typer.Option(
        None, "--reference",
        help="An .npz with mu and sigma, an .npz with arr_0 images, an image folder, or 'digits'. "
        "Default for a run: the recipe's evaluation reference (data.eval_dataset).",
    ),
    evaluator_name: str | None = typer.Option(
        None, "--evaluator",
        help="A registered evaluator (`noisevalue plugins list`). Default: the run's first evaluator; else fid.",
    ),
    params: list[str] | None = typer.Option(
        None, "--param", metavar="KEY=VALUE", help="A parameter of the evaluator (repeatable; YAML values).",
    ),
    metric: str | None = typer.Option(
        None, "--metric",
        help="fid, fd_digits or fd_digits32: the fid evaluator's feature space (default: the run's; else fd_digits for "
        "8x8 1-channel images, fid otherwise).",
    ),
    weights: Path | None = typer.Option(None, "--weights", help="InceptionV3 FID weights file (for fid)."),
    antialias: bool | None = typer.Option(
        None, "--antialias/--no-antialias",
        help="Antialiased resize to 299x299 (torchmetrics >= 1.8). Default off: matches TF-FID/ADM numbers.",
    ),
    num: int | None = typer.Option(
        None, "--num", help="Score the first N images (a run: draw N samples; default eval.num_samples)."
    ),
    stats_cache: Path | None = typer.Option(
        None, "--stats-cache", help="Folder of cached reference statistics (default: ~/.cache/noisevalue/reference_stats)."
    ),
    recipe: str | None = RecipeOpt,
    batch_size: int | None = BatchOpt,
    device: str | None = DeviceOpt,
) -> None:
    """Score samples against a reference with a registered evaluator (default: the run's, or
    the Fréchet distance fid / fd_digits); writes eval.json next to the samples."""

    with user_errors():
        from noisevalue.errors import DataError
        from noisevalue.sampling import score as scoring

        path = Path(samples)
        given = _parse_params(params or [])
        chosen: Any = None
        ref: Any = reference
        label = reference
        if path.is_dir() or (path.is_file() and path.suffix != ".npz"):  # a run, or weights from elsewhere
            npz, chosen, ref, label = _sample_for_eval(
                path, recipe, num, evaluator_name, given, metric, weights, antialias, reference, batch_size, device
            )
        elif path.is_file():
            npz = path
            from noisevalue.train.preflight import check_output

            check_output(npz.parent, f"'{npz}': its folder (eval.json goes there)")
            if evaluator_name or given or metric or weights is not None or antialias is not None:
                chosen = scoring.build_evaluator(evaluator_name, given, metric, weights, antialias)
            if reference is None:
                from noisevalue.errors import ConfigError

                raise ConfigError(
                    "--reference is required for an .npz: an .npz with mu and sigma, an .npz with arr_0 "
                    f"images, an image folder or '{scoring.DIGITS_REFERENCE}'"
                )
        else:
            raise DataError(f"'{path}' not found: expected a samples .npz (uint8 arr_0, NHWC) or a run folder")
        record = scoring.score_samples(
            npz, ref, chosen, num=num, stats_cache=stats_cache, reference_label=label, say=typer.echo,
        )
        typer.echo(f"{record['metric']} {record['value']:.6g}  ({record['n']} samples vs {record['reference']})")
        typer.echo(f"protocol {record['protocol_sha256']}:")
        for line in scoring.protocol_lines(record["protocol"]):
            typer.echo(line)
        typer.echo(f"written: {npz.parent / scoring.EVAL_FILE}")


def _parse_params(items: list[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` options as a dict (values read as YAML: numbers, booleans, lists)."""
    import yaml

    from noisevalue.errors import ConfigError

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--param {item!r}: expected KEY=VALUE")
        out[key.strip()] = yaml.safe_load(value) if value else None
    return out


def _sample_for_eval(
    run: Path, recipe: str | None, num: int | None, name: str | None, given: dict[str, Any],
    metric: str | None, weights: Path | None, antialias: bool | None, reference: str | None,
    batch_size: int | None, device: str | None,
) -> tuple[Path, Any, Any, str | None]:
    """A run: its evaluator (``name``, else the recipe's first; built before sampling, so
    that missing weights fail at once) with the recipe's parameters for it, the reference it
    trained against, then its samples with the recipe's settings (drawn unless a complete
    samples.npz with those settings is there)."""
    from noisevalue.sampling import sample as sp
    from noisevalue.sampling import score as scoring

    ctx = sp.resolve_run(run, recipe)
    r = ctx.recipe
    settings = sp.sample_settings(ctx, num=num, use_ema=r.sample.use_ema, batch_size=batch_size, device=device)
    comps = r.eval.evaluators
    name = name or (comps[0].name if comps else None)
    base = next((dict(c.params) for c in comps if c.name == name), {})
    if metric is not None and base.get("features", "inception") != scoring.METRICS.get(metric):
        base = {}  # another feature space than the run's: none of its settings apply
    chosen = None  # no evaluator named anywhere: fid in the feature space the images call for
    if name is not None or metric is not None or given or weights is not None or antialias is not None:
        chosen = scoring.build_evaluator(name, {**base, **given}, metric, weights, antialias)
    if reference is not None:
        ref: Any = reference
        label: str | None = reference
    elif base.get("reference_stats"):
        ref = label = str(base["reference_stats"])
    else:  # the very reference the run's evaluations scored against (and its cache)
        from noisevalue.train.reference import run_reference

        ref = run_reference(r)
        label = ref.label
    if isinstance(ref, str):
        scoring.parse_reference(ref)  # a missing reference fails before sampling
    npz = _draw(sp, ctx, settings, sp.default_out_dir(ctx, settings), batch_size is not None,
                launch_settings(1, "1", 0, None, "noisevalue"))
    return npz, chosen, ref, label
