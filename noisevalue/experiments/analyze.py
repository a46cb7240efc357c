"""``noisevalue analyze``: what a rater learns at each diffusion training stage (paper §5.3).

For every probed diffusion checkpoint (a stage-(i) step, or an explicit checkpoint folder) a
rater is meta-trained for ``analyze.outer_steps`` outer steps on it. Each rater then scores
the same ``analyze.candidates`` noises for each of ``analyze.num_images`` training images at
every normalised timestep of ``analyze.timesteps``; per (image, timestep) we keep the
Spearman correlation between the scores and the noises' L2 norms and the std of the scores
(:mod:`rater_stats`), and aggregate them by training stage and by timestep.

Layout under ``<output_dir>/analyze/``::

    init/checkpoints/step_0000000   step 0: the initial weights (no training), when probed
    rater-step<N>/                  the rater meta-trained on the step-N checkpoint (a stage)
    stats-step<N>.npz               its raw scores and the noise norms (a cache)
    scores_stats.csv                one line per (step, image, timestep)
    summary.csv, summary.md         count, mean, median, quartiles by stage and by timestep
    by_timestep.png, by_stage.png   violin plots (the paper's Figures 2 and 3)

Everything is reused when present: stages by their ``DONE`` marker (and refused when their
settings changed), score caches when their fingerprint (rater weights, images, noises,
timesteps) matches. With several processes the raters are meta-trained together (as any
stage) and the scoring of checkpoints is shared out between the ranks.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisevalue import checkpoint as ckpt
from noisevalue.checkpoint import atomic_file
from noisevalue.config import Recipe, TrainConfig
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.rater_stats import (
    SCORE_STD_DDOF,
    STAT_FIELDS,
    candidate_stats,
    discrete_timesteps,
    noise_norms,
    summarize,
)
from noisevalue.files import file_digest
from noisevalue.train.batches import seeded_generator

# random streams of the analysis (see batches.py for the training ones): which training
# images, and image i's candidate noises: randn((K, *latent_shape)) from
# seeded_generator(seed, i, STREAM_ANALYZE_NOISE)
STREAM_ANALYZE_IMAGES = 530
STREAM_ANALYZE_NOISE = 531
SCORE_ROWS = 1024  # rater inputs per forward call while scoring
CACHE_VERSION = 1

ANALYZE_DIR = "analyze"
INIT_DIR = "init"
SCORES_CSV = "scores_stats.csv"
SUMMARY_CSV = "summary.csv"
SUMMARY_MD = "summary.md"
BY_TIMESTEP_PNG = "by_timestep.png"
BY_STAGE_PNG = "by_stage.png"
STATISTICS = ("spearman", "score_std")


@dataclass
class StageScores:
    """One probed checkpoint's scores: ``scores [N, nT, K]``, ``norms [N, K]``."""

    step: int
    scores: np.ndarray
    norms: np.ndarray
    image_index: np.ndarray
    labels: np.ndarray

    def stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(Spearman, score std), each ``[N, nT]`` float64."""
        rho, std = candidate_stats(torch.from_numpy(self.scores), torch.from_numpy(self.norms)[:, None, :])
        return rho.numpy(), std.numpy()


# ---------------------------------------------------------------------- entry point
def run_analyze(
    recipe: Recipe, info: DistInfo, say: stages.Say,
    checkpoints: list[str] | None = None, steps: list[int] | None = None, signal: bool = False,
) -> list[Path]:
    """Run the analysis (or, with ``signal``, the meta-signal analysis of
    :mod:`noisevalue.experiments.signal`); returns the paths of the tables and figures."""
    if signal:
        if checkpoints or steps:
            raise ConfigError("analyze --signal probes the recipe's own stage-(i) checkpoint and rater; "
                              "drop --checkpoint / --step")
        from noisevalue.experiments.signal import run_signal

        return run_signal(recipe, info, say)
    if recipe.rater is None:
        raise ConfigError("analyze needs a 'rater' section in the recipe (the rater to meta-train per checkpoint)")
    a = recipe.analyze
    if not a.timesteps:
        raise ConfigError("analyze.timesteps: give at least one normalised timestep in [0, 1]")
    if len(set(a.timesteps)) != len(a.timesteps):
        raise ConfigError(f"analyze.timesteps: {list(a.timesteps)} lists a timestep twice")
    root = Path(recipe.output_dir) / ANALYZE_DIR
    targets = resolve_targets(recipe, info, say, checkpoints, steps)
    say(f"analyze: {len(targets)} checkpoint(s) at step(s) {', '.join(str(s) for s, _ in targets)}; "
        f"a rater each ({a.outer_steps} outer steps), {a.num_images} images x {a.candidates} noises x "
        f"{len(a.timesteps)} timesteps")
    raters: dict[int, Path] = {}
    for step, path in targets:
        raters[step] = stages.train_rater(recipe, info, say, path, root / f"rater-step{step}",
                                          outer_steps=a.outer_steps)
    score_all(recipe, info, say, root, raters)
    paths = output_paths(root)
    if info.is_main:
        results = [load_scores(root / f"stats-step{step}.npz") for step, _ in targets]
        write_outputs(recipe, root, results, say)
    barrier(info)
    return paths


def output_paths(root: Path) -> list[Path]:
    return [root / name for name in (SCORES_CSV, SUMMARY_CSV, SUMMARY_MD, BY_TIMESTEP_PNG, BY_STAGE_PNG)]


# ---------------------------------------------------------------------- checkpoints
def expected_steps(train: TrainConfig) -> list[int]:
    """The checkpoints a finished stage-(i) run keeps: the newest ``keep_checkpoints`` of
    those written (every ``ckpt_every`` steps and at the end) plus every multiple of
    ``keep_every`` among them (see :func:`noisevalue.checkpoint.save_checkpoint`)."""
    if train.steps == 0:
        return []
    written = sorted(set(range(train.ckpt_every, train.steps + 1, train.ckpt_every)) | {train.steps})
    kept = set(written[-train.keep_checkpoints:])
    if train.keep_every:
        kept |= {s for s in written if s % train.keep_every == 0}
    return sorted(kept)


def _missing_error(missing: list[int], available: list[int], future: bool) -> ConfigError:
    have = ", ".join(str(s) for s in [0, *available])
    verb = "will keep" if future else "kept"
    return ConfigError(
        f"analyze: no stage-(i) checkpoint at step {', '.join(str(s) for s in missing)}; the pretrain run "
        f"{verb} steps {have} (0 = the initial weights). Checkpoints are written every train.ckpt_every "
        "steps and only the newest train.keep_checkpoints are kept, except multiples of train.keep_every, "
        "which keep a trajectory (e.g. train.keep_every=500); or pick kept steps with --step / analyze.steps"
    )


def resolve_targets(
    recipe: Recipe, info: DistInfo, say: stages.Say,
    checkpoints: list[str] | None, steps: list[int] | None,
) -> list[tuple[int, Path]]:
    """(step label, diffusion checkpoint folder) per probed checkpoint, by step."""
    if checkpoints and steps:
        raise ConfigError("analyze: give --checkpoint or --step, not both")
    if checkpoints:
        return _explicit_checkpoints(checkpoints)
    wanted = steps if steps is not None else recipe.analyze.steps
    if wanted is not None:
        bad = [s for s in wanted if s < 0]
        if bad:
            raise ConfigError(f"analyze: step {bad[0]} is negative (0 is the initial weights)")
        wanted = sorted(set(wanted))
        if not wanted:
            raise ConfigError("analyze.steps: empty; list stage-(i) steps to probe, or null for all")
    pre_root = Path(recipe.output_dir) / "pretrain"
    found: dict[int, Path] = {}
    if wanted is None or any(wanted):
        if wanted is not None and not (pre_root / stages.DONE).is_file():
            will_keep = expected_steps(recipe.train)
            missing = [s for s in wanted if s and s not in will_keep]
            if missing:  # fail before a long stage-(i) run that cannot give them
                raise _missing_error(missing, will_keep, future=True)
        stages.pretrain(recipe, info, say)
        found = {ckpt.checkpoint_step(p): p for p in ckpt.list_checkpoints(pre_root / "checkpoints")}
        if wanted is None:
            wanted = [0, *sorted(found)]
        missing = [s for s in wanted if s and s not in found]
        if missing:
            raise _missing_error(missing, sorted(found), future=False)
    targets = [(s, found[s]) for s in wanted if s]
    if 0 in wanted:
        targets.insert(0, (0, initial_checkpoint(recipe, info, say)))
    return targets


def _explicit_checkpoints(checkpoints: list[str]) -> list[tuple[int, Path]]:
    out: dict[int, Path] = {}
    for given in checkpoints:
        path = ckpt.resolve_checkpoint(given)
        step = ckpt.require_diffusion(path, f"--checkpoint '{given}'").step
        if step in out and out[step] != path:
            raise ConfigError(
                f"--checkpoint: '{out[step]}' and '{path}' are both at step {step}; results are labelled "
                "by step, so probe one of them per call (with another output_dir)"
            )
        out[step] = path
    return sorted(out.items())


def initial_checkpoint(recipe: Recipe, info: DistInfo, say: stages.Say) -> Path:
    """Step 0: the diffusion model as stage (i) initialises it (same seed, EMA = weights),
    saved once with the same meta as a training checkpoint, in ``analyze/init``."""
    from noisevalue.train.diffusion_training import DiffusionTraining

    run_dir = Path(recipe.output_dir) / ANALYZE_DIR / INIT_DIR
    stage = stages.replace(
        stages.stage_recipe(recipe, run_dir, workflow="pretrain"),
        train=stages.replace(recipe.train, steps=0, init_from=None, compile=False),
        eval=stages.replace(recipe.eval, evaluators=[], every=None),
    )
    stages.check_stage_settings(stage)
    path = run_dir / "checkpoints" / ckpt.step_dir_name(0)
    if (run_dir / stages.DONE).is_file() and (path / ckpt.META).is_file():
        say(f"stage {run_dir}: done already, reused (the initial weights)")
        return path
    say(f"stage {run_dir}: writing the initial weights (step 0)")
    if info.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.atomic_write_text(run_dir / stages.STAGE_SETTINGS,
                               json.dumps(stages.stage_settings(stage), indent=1, sort_keys=True))
        stages.write_stage_recipe(stage)  # so `noisevalue sample` can read the folder like any run
    barrier(info)
    trainer = DiffusionTraining(stage, run_dir, info)
    try:
        trainer.setup()  # builds the model exactly as stage (i) does; EMA starts as the weights
        trainer.save_checkpoint()
    finally:
        trainer.cleanup()
    if info.is_main:
        ckpt.atomic_write_text(run_dir / stages.DONE, json.dumps({"metrics": {}}, indent=2))
    barrier(info)
    return path


# ---------------------------------------------------------------------- scoring
def cache_fingerprint(recipe: Recipe, rater_ckpt: Path) -> str:
    """What a score cache depends on: the rater's weights, the data, images, noises, timesteps."""
    a = recipe.analyze
    fp: dict[str, Any] = {
        "version": CACHE_VERSION,
        "rater": file_digest(rater_ckpt / "rater.safetensors"),
        "dataset": recipe.data.dataset.model_dump(mode="json"),
        "encoder": recipe.data.encoder.model_dump(mode="json"),
        "seed": recipe.seed,
        "num_images": a.num_images,
        "candidates": a.candidates,
        "timesteps": list(a.timesteps),
        "num_timesteps": recipe.diffusion.num_timesteps,
    }
    return json.dumps(fp, sort_keys=True)


def _cache_valid(path: Path, fingerprint: str) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path) as z:
            return str(z["fingerprint"]) == fingerprint
    except Exception:  # unreadable or old: recompute
        return False


def score_all(recipe: Recipe, info: DistInfo, say: stages.Say, root: Path, raters: dict[int, Path]) -> None:
    """Score every rater (or reuse its cache); checkpoints are shared out between ranks."""
    from noisevalue.raters import load_rater

    todo: list[tuple[int, Path, str]] = []
    for step, rater_dir in raters.items():
        rater_ckpt = ckpt.resolve_checkpoint(rater_dir)
        fp = cache_fingerprint(recipe, rater_ckpt)
        cache = root / f"stats-step{step}.npz"
        if _cache_valid(cache, fp):
            say(f"analyze: scores of step {step} reused ({cache})")
        else:
            todo.append((step, rater_ckpt, fp))
    barrier(info)  # every rank has decided what to score before any cache is written
    if not todo:
        return
    probe = ScoringInputs(recipe, info, root)
    for i, (step, rater_ckpt, fp) in enumerate(todo):
        if i % info.world_size != info.rank:
            continue
        rater, _ = load_rater(rater_ckpt)
        rater.to(info.device)
        scores, norms = probe.score(rater, f"score step {step}", show=info.is_main)
        save_scores(root / f"stats-step{step}.npz", step, scores, norms, probe, fp)
        say(f"analyze: scored step {step} with {rater_ckpt}")
    barrier(info)


class ScoringInputs:
    """The images, labels, candidate noises and timesteps every rater is scored on."""

    def __init__(self, recipe: Recipe, info: DistInfo, root: Path) -> None:
        from noisevalue.train.data import load_train_data
        from noisevalue.train.trainer import use_threads

        self.recipe, self.info = recipe, info
        a = recipe.analyze
        use_threads(recipe, info.device)
        data_recipe = stages.stage_recipe(recipe, root)
        data, encoder = load_train_data(data_recipe, root, info)  # collective (latent cache)
        if a.num_images > data.num_items:
            raise ConfigError(f"analyze.num_images: {a.num_images} is more than the {data.num_items} training images")
        encoder.to(info.device)
        self.latent_shape = tuple(data.latent_shape)
        self.num_classes = data.num_classes
        self.image_index = image_indices(recipe.seed, data.num_items, a.num_images)
        xs, ys = [], []
        for lo in range(0, a.num_images, 64):
            idx = self.image_index[lo:lo + 64]
            x, y = data.fetch(idx, torch.zeros(len(idx), dtype=torch.bool))
            xs.append(x.float().cpu())
            ys.append(y.long().cpu())
        self.x0, self.labels = torch.cat(xs), torch.cat(ys)
        self.timesteps = torch.tensor(discrete_timesteps(a.timesteps, recipe.diffusion.num_timesteps), dtype=torch.long)

    def noise(self, lo: int, hi: int) -> torch.Tensor:
        """Candidate noises of images ``lo..hi-1`` (positions in the analysis), ``[n, K, C, H, W]``."""
        return candidate_noise(self.recipe.seed, range(lo, hi), self.recipe.analyze.candidates, self.latent_shape)

    @torch.no_grad()
    def score(self, rater: torch.nn.Module, label: str, show: bool) -> tuple[np.ndarray, np.ndarray]:
        """(scores ``[N, nT, K]`` float32, noise norms ``[N, K]`` float64)."""
        from noisevalue.train.progress import StepProgress

        n_img, k, n_t = len(self.x0), self.recipe.analyze.candidates, len(self.timesteps)
        per_image = k * n_t
        chunk = max(1, SCORE_ROWS // per_image)
        dev = self.info.device
        param = next(iter(rater.parameters()), None)
        dtype = param.dtype if param is not None else torch.float32
        scores = np.empty((n_img, n_t, k), dtype=np.float32)
        norms = np.empty((n_img, k), dtype=np.float64)
        total = math.ceil(n_img / chunk)
        with StepProgress(label, total, enabled=show, print_every=max(1, total // 4)) as bar:
            for lo in range(0, n_img, chunk):
                hi = min(lo + chunk, n_img)
                n = hi - lo
                noise = self.noise(lo, hi)
                norms[lo:hi] = noise_norms(noise).numpy()
                shape = noise.shape[2:]
                # rows ordered (image, timestep, candidate)
                eps = noise[:, None].expand(n, n_t, k, *shape).reshape(-1, *shape)
                x0 = self.x0[lo:hi, None, None].expand(n, n_t, k, *shape).reshape(-1, *shape)
                t = self.timesteps[None, :, None].expand(n, n_t, k).reshape(-1)
                y = self.labels[lo:hi, None, None].expand(n, n_t, k).reshape(-1) if self.num_classes else None
                out = rater(eps.to(dev, dtype), t.to(dev), x0.to(dev, dtype), None if y is None else y.to(dev))
                scores[lo:hi] = out.float().reshape(n, n_t, k).cpu().numpy()
                bar.advance()
        return scores, norms


def image_indices(seed: int, num_items: int, num_images: int) -> torch.Tensor:
    """The training images the analysis scores (a seeded sample without replacement)."""
    return torch.randperm(num_items, generator=seeded_generator(seed, 0, STREAM_ANALYZE_IMAGES))[:num_images]


def candidate_noise(seed: int, positions: range | list[int], k: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The ``k`` candidate noises of each image position: the same for every checkpoint and timestep."""
    return torch.stack([
        torch.randn((k, *shape), generator=seeded_generator(seed, i, STREAM_ANALYZE_NOISE)) for i in positions
    ])


def save_scores(path: Path, step: int, scores: np.ndarray, norms: np.ndarray, probe: ScoringInputs, fp: str) -> None:
    with atomic_file(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(
            f, step=np.int64(step), scores=scores, norms=norms,
            image_index=probe.image_index.numpy(), labels=probe.labels.numpy(),
            timesteps=np.asarray(probe.recipe.analyze.timesteps, dtype=np.float64),
            discrete=probe.timesteps.numpy(), fingerprint=np.str_(fp),
        )


def load_scores(path: Path) -> StageScores:
    with np.load(path) as z:
        return StageScores(int(z["step"]), z["scores"], z["norms"], z["image_index"], z["labels"])


# ---------------------------------------------------------------------- outputs
def _num(v: float) -> str:
    return repr(float(v))


def _step_label(step: int) -> str:
    return f"{step // 1000}k" if step >= 1000 and step % 1000 == 0 else str(step)


def write_outputs(recipe: Recipe, root: Path, results: list[StageScores], say: stages.Say) -> list[Path]:
    a = recipe.analyze
    ts = list(a.timesteps)
    discrete = discrete_timesteps(ts, recipe.diffusion.num_timesteps)
    stats = {r.step: r.stats() for r in results}

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["step", "image", "image_index", "label", "t", "timestep", "spearman", "score_std"])
    for r in results:
        rho, std = stats[r.step]
        for i in range(len(r.image_index)):
            for j, t in enumerate(ts):
                w.writerow([r.step, i, int(r.image_index[i]), int(r.labels[i]), _num(t), discrete[j],
                            _num(rho[i, j]), _num(std[i, j])])
    ckpt.atomic_write_text(root / SCORES_CSV, buf.getvalue())

    Groups = dict[str, np.ndarray]  # statistic -> pooled values
    by_stage: dict[int, Groups] = {
        r.step: dict(zip(STATISTICS, (v.ravel() for v in stats[r.step]), strict=True)) for r in results
    }
    by_t: dict[float, Groups] = {
        t: {name: np.concatenate([stats[r.step][m][:, j] for r in results]) for m, name in enumerate(STATISTICS)}
        for j, t in enumerate(ts)
    }
    summary: dict[tuple[str, float], dict[str, dict[str, float | int]]] = {}
    for axis, groups in (("stage", by_stage), ("timestep", by_t)):
        for key, pooled in groups.items():
            summary[axis, key] = {name: summarize(values) for name, values in pooled.items()}

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["axis", "value", "statistic", *STAT_FIELDS])
    for (axis, key), per in summary.items():
        for name in STATISTICS:
            cell = per[name]
            w.writerow([axis, int(key) if axis == "stage" else _num(key), name,
                        cell["count"], cell["undefined"], *(_num(cell[f]) for f in STAT_FIELDS[2:])])
    ckpt.atomic_write_text(root / SUMMARY_CSV, buf.getvalue())
    ckpt.atomic_write_text(root / SUMMARY_MD, summary_markdown(recipe, results, summary, ts, discrete))

    plot_violins(root / BY_TIMESTEP_PNG, [f"{t:g}" for t in ts], list(by_t.values()),
                 "normalised timestep t", "all training stages pooled")
    plot_violins(root / BY_STAGE_PNG, [_step_label(s) for s in by_stage], list(by_stage.values()),
                 "diffusion training step", "all timesteps pooled")
    for step in by_stage:
        rho_s, std_s = summary["stage", step]["spearman"], summary["stage", step]["score_std"]
        say(f"analyze: step {step}: Spearman median {rho_s['median']:.3f} (IQR {rho_s['q1']:.3f}..{rho_s['q3']:.3f}), "
            f"score std median {std_s['median']:.4g}"
            + (f", {rho_s['undefined']} undefined" if rho_s["undefined"] else ""))
    paths = output_paths(root)
    say("analyze: " + " ".join(str(p) for p in paths))
    return paths


def _fmt(v: float) -> str:
    return "-" if math.isnan(v) else f"{v:.3f}"


def summary_markdown(recipe: Recipe, results: list[StageScores], summary: dict, ts: list[float], discrete: list[int]) -> str:
    a = recipe.analyze
    n = len(results[0].image_index) if results else 0
    head = ("| {} | n | Spearman mean | median | Q1..Q3 | undefined | score std mean | median | Q1..Q3 |\n"
            "|---|---|---|---|---|---|---|---|---|\n")

    def row(key: str, per: dict) -> str:
        r, s = per["spearman"], per["score_std"]
        return (f"| {key} | {s['count']} | {_fmt(r['mean'])} | {_fmt(r['median'])} | {_fmt(r['q1'])}..{_fmt(r['q3'])} "
                f"| {r['undefined']} | {_fmt(s['mean'])} | {_fmt(s['median'])} | {_fmt(s['q1'])}..{_fmt(s['q3'])} |\n")

    lines = [
        f"# What the rater learns: recipe '{recipe.name}' (paper section 5.3)\n\n",
        f"A rater meta-trained for {a.outer_steps} outer steps on each diffusion checkpoint scores "
        f"{a.candidates} candidate noises for each of {n} training images at {len(ts)} timesteps. "
        "Per (image, timestep): the Spearman correlation of the scores with the noises' L2 norms, "
        f"and the standard deviation of the scores (ddof={SCORE_STD_DDOF}). A constant score vector has "
        "no Spearman correlation: it is excluded from the Spearman statistics and counted as undefined.\n\n",
        "## By training stage (all timesteps pooled)\n\n",
        head.format("step"),
        *(row(str(s), summary["stage", s]) for s in (r.step for r in results)),
        "\n## By timestep (all training stages pooled)\n\n",
        head.format("t (step)"),
        *(row(f"{t:g} ({d})", summary["timestep", t]) for t, d in zip(ts, discrete, strict=True)),
    ]
    return "".join(lines)


def plot_violins(path: Path, labels: list[str], groups: list[dict[str, np.ndarray]], xlabel: str, pooled: str) -> None:
    """(a) Spearman and (b) score std, one violin per group (medians marked)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from noisevalue.experiments.figures import save_figure

    width = max(10.0, 0.45 * len(labels) * 2)
    fig, axes = plt.subplots(1, 2, figsize=(width, 4), dpi=120)
    titles = {"spearman": "(a) score-norm Spearman correlation", "score_std": "(b) score standard deviation"}
    for ax, name in zip(axes, STATISTICS, strict=True):
        data = [g[name][~np.isnan(g[name])] for g in groups]
        ok = [i for i, d in enumerate(data) if d.size >= 2 and np.ptp(d) > 0]
        if ok:
            ax.violinplot([data[i] for i in ok], positions=ok, widths=0.8, showmedians=True, showextrema=True)
        for i, d in enumerate(data):  # a violin needs spread; otherwise mark the value(s)
            if i not in ok and d.size:
                ax.plot([i], [float(np.median(d))], marker="_", markersize=18, color="C0")
        if name == "spearman":
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            ax.set_ylim(-1.05, 1.05)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels(labels, rotation=45 if len(labels) > 12 else 0)
        ax.set_xlim(-0.7, len(labels) - 0.3)
        ax.set_xlabel(xlabel)
        ax.set_title(f"{titles[name]}\n{pooled}", fontsize=10)
        ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    save_figure(fig, path)
