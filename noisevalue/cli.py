"""The ``noisevalue`` command line. torch and friends are imported inside commands only,
so ``noisevalue --help`` answers at once."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer

from noisevalue.cli_options import (
    NnodesOpt,
    NodeRankOpt,
    NprocOpt,
    OneLineErrors,
    RdzvIdOpt,
    RdzvOpt,
    launch_settings,
    single_process,
    user_errors,
    world_size,
)

app = typer.Typer(
    cls=OneLineErrors,
    help="noisevalue: training-time noise valuation for diffusion models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
recipe_app = typer.Typer(help="Inspect and check recipes.", no_args_is_help=True)
plugins_app = typer.Typer(help="Registered components and where they come from.", no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
app.add_typer(plugins_app, name="plugins")


def _split_recipe_arg(recipe: str | None, overrides: list[str] | None) -> tuple[str | None, list[str]]:
    """``noisevalue run a.b=1`` means the default recipe with an override."""
    rest = list(overrides or [])
    if recipe is not None and "=" in recipe and not Path(recipe).exists():
        return None, [recipe, *rest]
    return recipe, rest


RecipeArg = typer.Argument(None, help="Recipe file or built-in recipe name (default: digits).")
OverridesArg = typer.Argument(None, help="Overrides: key=value (OmegaConf dot-list) or ~key.")


@app.command()
def run(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    resume: bool = typer.Option(False, "--resume", help="Continue from the run's latest checkpoint."),
    allow_changes: list[str] | None = typer.Option(
        None, "--allow-changes", metavar="KEY",
        help="With --resume: accept this result-relevant change against the run's saved recipe (repeatable).",
    ),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Run a recipe: train, checkpoint, sample and evaluate into its output_dir."""
    with user_errors():
        from noisevalue import checkpoint as ckpt
        from noisevalue import distributed, jobs
        from noisevalue.config import (
            RESOLVED_RECIPE,
            check_components,
            load_recipe_dict,
            parse_recipe,
        )
        from noisevalue.errors import CheckpointError, UserError

        source, extra = _split_recipe_arg(recipe, overrides)
        data = load_recipe_dict(source, extra)
        parsed = parse_recipe(data, str(source or "<built-in recipe 'digits'>"))
        check_components(parsed)
        run_dir = Path(parsed.output_dir)
        existing = ckpt.latest_checkpoint(run_dir / "checkpoints")
        if parsed.workflow == "protocol":
            pass  # each stage is skipped when done and resumed when interrupted
        elif resume and existing is None:
            raise CheckpointError(f"--resume: no checkpoint in '{run_dir / 'checkpoints'}'")
        if resume and existing is not None and parsed.workflow != "protocol":
            _check_resume(parsed, run_dir, set(allow_changes or []))
        if not resume and existing is not None:
            raise UserError(
                f"output_dir '{run_dir}' already holds checkpoints (latest {existing.name}); "
                "pass --resume to continue it, or set output_dir=... for a new run"
            )
        launch = launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id)
        from omegaconf import OmegaConf

        from noisevalue.train.preflight import check_run

        check_run(parsed, run_dir, resume=resume, processes=world_size(launch), per_node=nproc_per_node)
        ckpt.atomic_write_text(run_dir / RESOLVED_RECIPE, OmegaConf.to_yaml(OmegaConf.create(data)))
        typer.echo(
            f"noisevalue run: recipe '{parsed.name}' -> {run_dir}  "
            f"(workflow {parsed.workflow}, model {parsed.model.name}, {parsed.train.steps} steps, "
            f"global batch {parsed.train.global_batch_size}, seed {parsed.seed}, "
            f"processes {world_size(launch)}{', resuming' if resume else ''})"
        )
        if single_process(launch):
            from noisevalue.experiments.commands import run_workflow

            info = distributed.init(**jobs.init_options(parsed))
            metrics = run_workflow(parsed, run_dir, info, resume=resume)
            _print_result(run_dir, metrics)
            return
        args = jobs.launcher_args("run", run_dir, resume=resume, **launch)
        typer.echo("torch.distributed.run " + " ".join(args))
        distributed.launch(args)
        _print_result(run_dir, None)


#: settings a resumed run may change freely: the budget and the checkpoint and evaluation
#: cadence do not change the steps already taken (resume stays exact, tested)
RESUME_FREE = {
    "train.steps", "meta.outer_steps", "train.ckpt_every", "meta.ckpt_every", "train.keep_checkpoints",
    "train.keep_every", "eval.every",
}


def _check_resume(parsed: Any, run_dir: Path, allowed: set[str]) -> None:
    """``--resume`` continues the same run: a result-relevant setting that differs from the
    run's saved recipe stops it, unless named by ``--allow-changes``."""
    from noisevalue.config import RESOLVED_RECIPE, load_recipe
    from noisevalue.errors import ConfigError
    from noisevalue.experiments.stages import changed_settings

    saved = run_dir / RESOLVED_RECIPE
    if not saved.is_file():
        return
    changed = [c for c in changed_settings(load_recipe(saved), parsed) if c[0] not in allowed | RESUME_FREE]
    if changed:
        key, old, new = changed[0]
        more = f" (and {len(changed) - 1} more: {', '.join(c[0] for c in changed[1:4])})" if len(changed) > 1 else ""
        raise ConfigError(
            f"--resume: {key} was {old!r} when this run started, the recipe now says {new!r}{more}; "
            f"pass --allow-changes {key} to continue with it, or set output_dir=... for a new run"
        )


def _print_result(run_dir: Path, metrics: dict | None) -> None:
    import json

    if metrics is None and (run_dir / "metrics.json").is_file():
        metrics = json.loads((run_dir / "metrics.json").read_text()).get("metrics", {})
    shown = ", ".join(f"{k} {v:.4g}" for k, v in (metrics or {}).items() if "baseline" not in k)
    typer.echo(f"done: {run_dir}  {shown}")


def _experiment(
    command: str, recipe: str | None, overrides: list[str] | None, options: dict, launch: dict,
    check: Callable[[Any], object] | None = None,
) -> None:
    """Load the recipe (and ``check`` it), then run an experiment command here or under
    torch.distributed.run."""
    import json

    from omegaconf import OmegaConf

    from noisevalue import checkpoint as ckpt
    from noisevalue import distributed, jobs
    from noisevalue.config import RESOLVED_RECIPE, check_components, load_recipe_dict, parse_recipe

    source, extra = _split_recipe_arg(recipe, overrides)
    data = load_recipe_dict(source, extra)
    parsed = parse_recipe(data, str(source or "<built-in recipe 'digits'>"))
    check_components(parsed)
    if check is not None:
        check(parsed)
    from noisevalue.train.preflight import check_run

    # the experiment trains stage (i) and raters as the protocol does, into output_dir
    check_run(parsed.model_copy(update={"workflow": "protocol"}), parsed.output_dir,
              processes=world_size(launch), per_node=launch["nproc_per_node"])
    job_dir = Path(parsed.output_dir) / command
    typer.echo(
        f"noisevalue {command}: recipe '{parsed.name}' -> {job_dir}  (model {parsed.model.name}, "
        f"seeds {parsed.ladder.seeds if command == 'ladder' else parsed.continuation_seeds()}, "
        f"processes {world_size(launch)})"
    )
    if single_process(launch):
        from noisevalue.experiments.commands import run_experiment

        info = distributed.init(**jobs.init_options(parsed))
        outputs = run_experiment(command, parsed, info, options)
    else:
        ckpt.atomic_write_text(job_dir / RESOLVED_RECIPE, OmegaConf.to_yaml(OmegaConf.create(data)))
        ckpt.atomic_write_text(job_dir / jobs.JOB, json.dumps({"command": command, "options": options}, indent=2))
        args = jobs.launcher_args("experiment", job_dir, **launch)
        typer.echo("torch.distributed.run " + " ".join(args))
        distributed.launch(args)
        outputs = sorted(p for p in job_dir.iterdir() if p.suffix in (".md", ".csv", ".png"))
    typer.echo(f"{command} done; tables and figures:")
    for path in outputs:
        typer.echo(f"  {path}")


@app.command()
def compare(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    methods: list[str] | None = typer.Option(
        None, "--method", metavar="NAME",
        help="A method: a label of select.methods, or a registered selector or loss weighting "
        "(repeatable; default: all of select.methods). Vanilla is always the reference.",
    ),
    budget: str | None = typer.Option(
        None, "--budget", metavar="wall|flops",
        help="Also compare each method with vanilla trained on the same compute, the method's wall "
        "time or FLOPs (vanilla gets the extra steps): compare_budget.{md,csv,png}.",
    ),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Training-side methods side by side from one stage-(i) checkpoint: the same budget and
    paired seeds, one table of differences from vanilla, and each method's wall time."""
    with user_errors():
        from noisevalue.errors import ConfigError
        from noisevalue.experiments.budget import BUDGETS
        from noisevalue.experiments.compare import compare_methods

        if budget is not None and budget not in BUDGETS:
            raise ConfigError(f"--budget: expected one of {', '.join(BUDGETS)}, got {budget!r}")
        _experiment("compare", recipe, overrides, {"methods": list(methods or []), "budget": budget},
                    launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id),
                    check=lambda parsed: compare_methods(parsed, list(methods or [])))


@app.command()
def ablate(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    remove: list[str] | None = typer.Option(
        None, "--remove", help="A rater input to remove: timestep, image or label (repeatable: one variant)."
    ),
    noise_only: bool = typer.Option(False, "--noise-only", help="The variant that sees the noise only."),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Rater input ablation (paper Table 2): a rater per variant on the same stage-(i)
    checkpoint, a continuation with each, and a table against the full rater.
    Without --remove/--noise-only: all of the recipe's ablate.variants."""
    with user_errors():
        from noisevalue.config import ABLATION_INPUTS
        from noisevalue.errors import ConfigError

        variants = None
        if remove or noise_only:
            bad = [r for r in remove or [] if r not in ABLATION_INPUTS]
            if bad:
                raise ConfigError(f"--remove {bad[0]}: expected one of {', '.join(ABLATION_INPUTS)}")
            variants = [sorted(set(remove or []))] if remove else []
            if noise_only:
                variants.append(list(ABLATION_INPUTS))
        _experiment("ablate", recipe, overrides, {"variants": variants},
                    launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id))


@app.command()
def transfer(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    rater: str | None = typer.Option(
        None, "--rater", help="A trained rater (run or checkpoint folder). Default: the recipe's stage-(ii) rater."
    ),
    to: list[str] | None = typer.Option(
        None, "--to", help="A larger backbone (registered name; repeatable). Default: transfer.targets."
    ),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Apply a frozen rater to larger backbones (paper Table 4), each continued from the
    checkpoint whose training loss matches the rater's source (appendix B.4)."""
    with user_errors():
        _experiment("transfer", recipe, overrides, {"rater": rater, "targets": list(to) if to else None},
                    launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id),
                    check=lambda _: _check_transfer_options(rater, list(to or [])))


def _check_transfer_options(rater: str | None, targets: list[str]) -> None:
    from noisevalue import registry
    from noisevalue.errors import UserError

    for name in targets:
        try:
            registry.get("backbone", name)
        except UserError as exc:
            raise type(exc)(f"--to: {exc}") from None
    if rater is not None:
        from noisevalue.raters import load_rater

        load_rater(rater)


@app.command()
def analyze(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    checkpoints: list[str] | None = typer.Option(
        None, "--checkpoint", "--checkpoints", help="A diffusion checkpoint folder to probe (repeatable)."
    ),
    steps: list[int] | None = typer.Option(
        None, "--step", "--steps",
        help="A stage-(i) step to probe (repeatable; 0 is the initial weights). Default: analyze.steps.",
    ),
    signal: bool = typer.Option(
        False, "--signal",
        help="Instead: rank agreement of the trained rater, the untrained one and the norm baselines "
             "with the oracle gradient alignment on held-out candidate groups.",
    ),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """What the rater learns (paper section 5.3): a short-trained rater per diffusion
    checkpoint; score-norm Spearman correlation and score std by stage and timestep.
    With --signal: whether the rater's scores rank candidates like the meta-objective."""
    with user_errors():
        def check(_: Any) -> None:
            from noisevalue.errors import ConfigError
            from noisevalue.train.preflight import check_diffusion_checkpoint

            for path in checkpoints or []:
                check_diffusion_checkpoint(path, f"--checkpoint {path}")
            for step in steps or []:
                if step < 0:
                    raise ConfigError(f"--step {step}: expected a stage-(i) step >= 0")

        _experiment("analyze", recipe, overrides,
                    {"checkpoints": list(checkpoints) if checkpoints else None, "steps": list(steps) if steps else None,
                     "signal": signal},
                    launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id), check=check)


@app.command()
def ladder(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Selection over horizons and optimizers: from the stage-(i) checkpoint, each method of
    ladder.methods takes up to max(ladder.horizons) steps with each of ladder.optimizers, per
    seed of ladder.seeds; the held-out loss after each horizon, paired against vanilla."""
    with user_errors():
        from noisevalue.experiments.ladder import check_ladder

        _experiment("ladder", recipe, overrides, {},
                    launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id), check=check_ladder)


@app.command()
def cache(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Encode the recipe's training data once into its latent cache (data.latent_cache,
    default <output_dir>/latents), every process its own shards, before training: runs with
    the same data and encoder then reuse it. A complete cache is reused, an unfinished one
    resumed."""
    with user_errors():
        from noisevalue import distributed, jobs
        from noisevalue.config import load_recipe_dict, parse_recipe
        from noisevalue.train.data import build_cache, cache_folder
        from noisevalue.train.preflight import check_cache

        source, extra = _split_recipe_arg(recipe, overrides)
        data = load_recipe_dict(source, extra)
        parsed = parse_recipe(data, str(source or "<built-in recipe 'digits'>"))
        launch = launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id)
        cache_dir = cache_folder(parsed, parsed.output_dir)
        state, present, shards, items = check_cache(parsed, cache_dir, per_node=nproc_per_node)
        if state == "complete":
            _print_cache(cache_dir, "complete already, reused (nothing encoded)")
            return
        d = parsed.data
        resuming = f" ({present} present already: resumed)" if state == "partial" else ""
        typer.echo(
            f"noisevalue cache: recipe '{parsed.name}' -> {cache_dir}  ({items} items"
            f"{' and their flips' if d.random_flip else ''}, encoder {d.encoder.name}, {d.cache_dtype}, "
            f"{shards} shards{resuming}, processes {world_size(launch)})"
        )
        if single_process(launch):
            info = distributed.init(**jobs.init_options(parsed))
            build_cache(parsed, parsed.output_dir, info, say=typer.echo)
        else:
            import tempfile

            from omegaconf import OmegaConf

            from noisevalue import checkpoint as ckpt
            from noisevalue.config import RESOLVED_RECIPE, set_dotted

            # the workers' recipe, naming the cache by its absolute path; a folder of this
            # machine's own, as each machine's launcher starts only its own workers
            set_dotted(data, "data.latent_cache", str(cache_dir.resolve()))
            with tempfile.TemporaryDirectory(prefix="noisevalue-cache-") as job:
                ckpt.atomic_write_text(Path(job) / RESOLVED_RECIPE, OmegaConf.to_yaml(OmegaConf.create(data)))
                args = jobs.launcher_args("cache", job, **launch)
                typer.echo("torch.distributed.run " + " ".join(args))
                distributed.launch(args)
        _print_cache(cache_dir, "done")


def _print_cache(cache_dir: Path, what: str) -> None:
    from noisevalue.data.latent_cache import latent_cache_size

    items, size = latent_cache_size(cache_dir)
    shown = next(f"{size / 10**p:.3g} {unit}" for p, unit in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "bytes"))
                 if size >= 10**p or p == 0)
    typer.echo(f"latent cache {cache_dir}: {what}; {items} items, {shown} on disk ({size} bytes)")


@recipe_app.command("validate")
def recipe_validate(
    recipe: str | None = RecipeArg,
    overrides: list[str] | None = OverridesArg,
    files: bool = typer.Option(
        True, "--files/--no-files",
        help="Also open what the recipe names on this machine (data, weights files, checkpoints, device), "
        "as a run does before it starts. --no-files: the recipe alone (keys, types, ranges, components) "
        "and its batches against the process count.",
    ),
    nproc_per_node: int = NprocOpt,
    nnodes: str = NnodesOpt,
    node_rank: int = NodeRankOpt,
    rdzv_endpoint: str | None = RdzvOpt,
    rdzv_id: str = RdzvIdOpt,
) -> None:
    """Check a recipe without running it: keys, types, ranges, component names and parameters,
    every global batch against the processes that the launch options (as for run) start, and
    (unless --no-files) the data, weights files, checkpoints and device it names."""
    with user_errors():
        from noisevalue.config import check_components, load_recipe

        source, extra = _split_recipe_arg(recipe, overrides)
        parsed = load_recipe(source, extra)
        check_components(parsed)
        processes = world_size(launch_settings(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_id))
        if files:
            from noisevalue.train.preflight import check_recipe

            check_recipe(parsed, processes=processes, per_node=nproc_per_node)
        else:
            from noisevalue.train.preflight import check_batches

            check_batches(parsed, processes)
        checked = "recipe and files" if files else "recipe only"
        typer.echo(f"{source or parsed.name}: ok ({checked}; recipe '{parsed.name}', workflow {parsed.workflow}, "
                   f"model {parsed.model.name}, processes {processes})")


@recipe_app.command("show")
def recipe_show(recipe: str | None = RecipeArg, overrides: list[str] | None = OverridesArg) -> None:
    """Print the recipe with overrides applied, interpolations resolved and defaults filled."""
    with user_errors():
        from omegaconf import OmegaConf

        from noisevalue.config import load_recipe_dict, parse_recipe

        source, extra = _split_recipe_arg(recipe, overrides)
        data = load_recipe_dict(source, extra)
        parsed = parse_recipe(data, str(source or "<built-in recipe 'digits'>"))
        shown = parsed.model_dump(mode="json")
        # auto is resolved for this machine's device when parsed; the copy keeps it, so that a
        # copy made on a CPU node still trains in bf16, compiled, on the GPUs it is run on
        train = data.get("train")
        asked = train if isinstance(train, dict) else {}
        for key in ("precision", "compile"):
            if asked.get(key, "auto") == "auto":
                shown["train"][key] = "auto"
        typer.echo(OmegaConf.to_yaml(OmegaConf.create(shown)))
        from noisevalue.config import uses_cuda

        tr = parsed.train
        typer.echo(
            f"# train.device {tr.device}: {'CUDA' if uses_cuda(tr.device) else 'CPU'} on this machine, so "
            f"precision {tr.precision} and compile {str(tr.compile).lower()} (their default, auto, is bf16 "
            "and compiled on CUDA, fp32 and eager on the CPU)"
        )


@recipe_app.command("list")
def recipe_list() -> None:
    """The built-in recipes (usable by name: ``noisevalue run digits``)."""
    from noisevalue.config import builtin_recipe_names

    for name in builtin_recipe_names():
        typer.echo(name)


@plugins_app.command("list")
def plugins_list(
    kind: str | None = typer.Option(None, help="Only this kind."),
    check: bool = typer.Option(
        False, "--check", help="Also import every component and report those that fail (exit code 2 if any)."
    ),
) -> None:
    """Every registered component by kind, with the distribution that provides it.
    Reads entry-point metadata only: nothing is imported unless --check is given."""
    with user_errors():
        from noisevalue import registry
        from noisevalue.errors import PluginError

        entries = registry.entries(kind)
        if registry._autoload_disabled():
            typer.echo(f"({registry.AUTOLOAD_ENV} is set: built-ins only)")
        current = None
        failed = clashed = 0
        for entry in entries:
            if entry.kind != current:
                current = entry.kind
                typer.echo(f"{entry.kind}:")
            status = ""
            if entry.clashes:
                clashed += 1
                others = ", ".join(f"distribution '{e.distribution}' ({e.target})" for e in entry.clashes)
                status += f"  [CLASH: also provided by {others}]"
            if check:
                for provider in entry.providers:
                    try:
                        provider.load()
                    except PluginError as exc:
                        failed += 1
                        status += f"  [FAILED: {exc}]"
            typer.echo(f"  {entry.name:<16} {entry.distribution:<20} {entry.target}{status}")
        if check and (failed or clashed):
            problems = [f"{n} {what}" for n, what in ((failed, "failed to load"), (clashed, "name clash(es)")) if n]
            typer.echo(f"noisevalue: error: plugins check: {', '.join(problems)}", err=True)
            raise typer.Exit(2)


from noisevalue.cli_sampling import evaluate, export_model, sample  # noqa: E402

app.command("sample")(sample)
app.command("eval")(evaluate)
app.command("export")(export_model)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
