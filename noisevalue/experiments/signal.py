"""``noisevalue analyze --signal``: does the rater rank candidate noises the way the
meta-objective would?

The oracle score of a candidate noise is its gradient alignment with the validation loss,
``<grad_theta L_val, grad_theta l_k>`` at the diffusion checkpoint the rater was trained on
(:func:`noisevalue.selectors.oracle.alignment_scores`). On held-out groups of K candidates
that share an image, label and timestep, every scorer (the meta-trained rater, the same rater
untrained, and the max-norm / min-norm baselines) is compared with the oracle within each
group:

* Spearman correlation of its scores with the oracle's (undefined for constant scores);
* top-1 agreement: its best candidate is the oracle's best (chance: 1/K);
* captured gain: ``(a[pick] - mean a) / (max a - mean a)`` of the oracle scores ``a``: the
  share of the best achievable alignment gain its top-1 pick realises (1 = the oracle,
  0 = a random pick in expectation).

Held-out data: the meta validation split (``meta.val_fraction``, never in a rater's inner
batches) is cut in two; the groups' images come from the first half, ``L_val`` is the mean
loss over the second half with ``analyze.signal_val_draws`` (t, noise) draws per image.

    <output_dir>/analyze/signal/signal.csv     one line per scorer and group
    <output_dir>/analyze/signal/signal.md      by timestep bin and in total
    <output_dir>/analyze/signal/signal.png
"""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import torch

from noisevalue import checkpoint as ckpt
from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import ConfigError
from noisevalue.experiments import stages
from noisevalue.experiments.paired import mean_ci
from noisevalue.experiments.rater_stats import spearman
from noisevalue.train.batches import seeded_generator, validation_split
from noisevalue.train.run_log import read_scalar

SIGNAL_DIR = "signal"
STREAM_SIGNAL = 532  # the groups' images, timesteps and candidates, and the L_val draws
TIME_BINS = 10
SCORE_ROWS = 1024  # candidates per rater or oracle call


def run_signal(recipe: Recipe, info: DistInfo, say: stages.Say) -> list[Path]:
    from noisevalue.experiments.protocol import seed_rater, untrained_rater

    if recipe.rater is None:
        raise ConfigError("analyze --signal needs a 'rater' section in the recipe")
    out = Path(recipe.output_dir) / "analyze" / SIGNAL_DIR
    pretrained = stages.pretrain(recipe, info, say)
    trained = seed_rater(recipe, info, say, pretrained, recipe.seed)
    untrained = untrained_rater(recipe, info, say, pretrained, recipe.seed)
    inputs = SignalInputs(recipe, info, out, ckpt.resolve_checkpoint(pretrained))  # collective
    paths = [out / "signal.csv", out / "signal.md", out / "signal.png"]
    if info.is_main:
        from noisevalue.raters import NormRater, load_rater

        scorers = {
            "rater (meta-trained)": load_rater(trained)[0],
            "rater (untrained)": load_rater(untrained)[0],
            "max-norm": NormRater(1),
            "min-norm": NormRater(-1),
        }
        say(f"analyze --signal: {inputs.groups} held-out groups of {inputs.k} candidates; oracle alignments "
            f"against L_val on {len(inputs.val[0])} samples")
        oracle = inputs.oracle()
        results = {name: group_statistics(inputs.score(rater.to(info.device)), oracle) for name, rater in scorers.items()}
        cosine = read_scalar(trained, "signal/cosine_one_step")[1]
        write_signal(out, recipe, inputs, results, cosine)
        say("analyze --signal: " + " ".join(str(p) for p in paths))
    barrier(info)
    return paths


class SignalInputs:
    """The held-out groups, the validation batch and the diffusion model of the analysis."""

    def __init__(self, recipe: Recipe, info: DistInfo, root: Path, checkpoint: Path) -> None:
        from noisevalue.diffusion import Diffusion
        from noisevalue.train.build import checkpoint_backbone
        from noisevalue.train.data import load_train_data
        from noisevalue.train.trainer import use_threads

        a, dev = recipe.analyze, info.device
        use_threads(recipe, dev)
        data_recipe = stages.stage_recipe(recipe, root)
        data, _ = load_train_data(data_recipe, root, info)
        meta = ckpt.require_diffusion(checkpoint, "meta.pretrained")
        assert meta.backbone is not None
        self.model = checkpoint_backbone(checkpoint, meta.backbone, "model", "meta.pretrained",
                                         str(checkpoint)).to(dev)
        self.diffusion = Diffusion.from_config(recipe.diffusion)
        self.device, self.k, self.groups = dev, a.candidates, a.signal_groups
        self.num_classes = data.num_classes
        _, val_idx = validation_split(data.num_items, recipe.meta.val_fraction, recipe.seed)
        if len(val_idx) < 2:
            raise ConfigError(f"meta.val_fraction: {len(val_idx)} validation item(s); --signal needs at least 2")
        half = len(val_idx) // 2
        g = seeded_generator(recipe.seed, 0, STREAM_SIGNAL)
        pick = val_idx[:half][torch.randint(0, half, (self.groups,), generator=g)]
        no_flip = torch.zeros(self.groups, dtype=torch.bool)
        self.x0, y = data.fetch(pick, no_flip)
        self.y = y if data.num_classes else None
        self.t = torch.randint(0, self.diffusion.num_timesteps, (self.groups,), generator=g)
        self.noise = torch.randn((self.groups, self.k, *data.latent_shape), generator=g)
        rest = val_idx[half:].repeat(a.signal_val_draws)
        vx0, vy = data.fetch(rest, torch.zeros(len(rest), dtype=torch.bool))
        vt = torch.randint(0, self.diffusion.num_timesteps, (len(rest),), generator=g)
        vnoise = torch.randn((len(rest), *data.latent_shape), generator=g)
        self.val = (vx0.to(dev), vy.to(dev) if data.num_classes else None, vt.to(dev), vnoise.to(dev))

    def oracle(self) -> torch.Tensor:
        """Alignment of every candidate with the validation gradient, ``[groups, K]``."""
        from noisevalue.selectors.oracle import alignment_scores

        per_call = max(1, SCORE_ROWS // self.k)
        parts = []
        for lo in range(0, self.groups, per_call):
            sl = slice(lo, lo + per_call)
            y = None if self.y is None else self.y[sl].to(self.device)
            parts.append(alignment_scores(self.model, self.diffusion, self.x0[sl].to(self.device), y,
                                          self.t[sl].to(self.device), self.noise[sl].to(self.device),
                                          self.val).cpu())
        return torch.cat(parts).double()

    @torch.no_grad()
    def score(self, rater: torch.nn.Module) -> torch.Tensor:
        """A scorer's scores of every candidate, ``[groups, K]``."""
        k = self.k
        flat = self.noise.reshape(self.groups * k, *self.noise.shape[2:])
        x0 = self.x0.repeat_interleave(k, 0)
        t = self.t.repeat_interleave(k, 0)
        y = None if self.y is None else self.y.repeat_interleave(k, 0)
        out = []
        for lo in range(0, len(flat), SCORE_ROWS):
            sl = slice(lo, lo + SCORE_ROWS)
            out.append(rater(flat[sl].to(self.device), t[sl].to(self.device), x0[sl].to(self.device),
                             None if y is None else y[sl].to(self.device)).double().cpu())
        return torch.cat(out).reshape(self.groups, k)


def group_statistics(scores: torch.Tensor, oracle: torch.Tensor) -> dict[str, np.ndarray]:
    """Per group: Spearman with the oracle, top-1 agreement, captured gain (float64 arrays)."""
    rho = spearman(scores, oracle)
    pick = scores.argmax(dim=1)
    best = oracle.argmax(dim=1)
    mean = oracle.mean(dim=1)
    span = oracle.max(dim=1).values - mean
    chosen = oracle.gather(1, pick[:, None]).squeeze(1)
    captured = torch.where(span > 0, (chosen - mean) / span, torch.full_like(span, math.nan))
    return {"spearman": rho.numpy(), "top1": (pick == best).double().numpy(), "captured": captured.numpy()}


def time_bin(t: torch.Tensor, num_timesteps: int) -> np.ndarray:
    return (t.double() / num_timesteps * TIME_BINS).floor().clamp(max=TIME_BINS - 1).long().numpy()


def _mean_ci(values: np.ndarray) -> tuple[float, float, int]:
    ok = values[~np.isnan(values)]
    mean, half = mean_ci(ok.tolist())
    return mean, half, int(ok.size)


def summary_rows(inputs: SignalInputs, results: dict[str, dict[str, np.ndarray]]) -> list[dict]:
    bins = time_bin(inputs.t, inputs.diffusion.num_timesteps)
    rows = []
    for name, stats in results.items():
        for b in [*range(TIME_BINS), None]:
            mask = np.ones_like(bins, dtype=bool) if b is None else bins == b
            row: dict = {"scorer": name, "t": "all" if b is None else f"{b / TIME_BINS:.1f}-{(b + 1) / TIME_BINS:.1f}"}
            for key in ("spearman", "top1", "captured"):
                mean, half, n = _mean_ci(stats[key][mask])
                row.update({key: mean, f"{key}_ci95": half, f"{key}_n": n})
            rows.append(row)
    return rows


def write_signal(out: Path, recipe: Recipe, inputs: SignalInputs, results: dict[str, dict[str, np.ndarray]],
                 cosine: list[float]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["scorer", "group", "t", "spearman", "top1", "captured"])
    for name, stats in results.items():
        for i in range(inputs.groups):
            w.writerow([name, i, int(inputs.t[i]), *(float(stats[k][i]) for k in ("spearman", "top1", "captured"))])
    ckpt.atomic_write_text(out / "signal.csv", buf.getvalue())
    rows = summary_rows(inputs, results)
    m = recipe.meta

    def cell(row: dict, key: str) -> str:
        mean, half = row[key], row[f"{key}_ci95"]
        if math.isnan(mean):
            return "-"
        return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"

    lines = [
        f"# Meta-signal of recipe '{recipe.name}': rater scores against the oracle", "",
        f"{inputs.groups} held-out groups of K = {inputs.k} candidate noises (meta validation split, first "
        f"half); oracle score = <grad L_val, grad l_k> at the stage-(i) checkpoint, L_val over "
        f"{len(inputs.val[0])} held-out samples (second half x {recipe.analyze.signal_val_draws} draws). "
        f"Rater meta-trained with inner optimizer `{m.inner_optimizer}` (lr {m.inner_lr}, S = {m.inner_steps}, "
        f"{m.outer_steps} outer steps, engine `{m.optimizer.name}`). Cells: mean ± 95% CI over groups. "
        f"Chance: Spearman 0, top-1 {1 / inputs.k:.3f}, captured gain 0.", "",
        "## In total", "",
        "| scorer | Spearman with oracle | top-1 = oracle's | captured gain | groups |",
        "|---|---|---|---|---|",
    ]
    for row in rows:
        if row["t"] == "all":
            lines.append(f"| {row['scorer']} | {cell(row, 'spearman')} | {cell(row, 'top1')} | "
                         f"{cell(row, 'captured')} | {row['top1_n']} |")
    if cosine:
        finite = [c for c in cosine if not math.isnan(c)]
        if finite:
            lines += ["", f"During meta-training the engine's meta-gradient had a cosine of {np.mean(finite):.3f} "
                      f"(first {finite[0]:.3f}, last {finite[-1]:.3f}, {len(finite)} probes) with the one-step "
                      "gradient-alignment meta-gradient of Theorem 4.2 (TensorBoard `signal/cosine_one_step`)."]
    lines += ["", "## Spearman with the oracle by timestep (t / T)", "",
              "| t | " + " | ".join(results) + " |", "|---|" + "---|" * len(results)]
    for b in range(TIME_BINS):
        label = f"{b / TIME_BINS:.1f}-{(b + 1) / TIME_BINS:.1f}"
        cells = [cell(r, "spearman") for name in results for r in rows if r["scorer"] == name and r["t"] == label]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    ckpt.atomic_write_text(out / "signal.md", "\n".join(lines) + "\n")
    plot_signal(out / "signal.png", rows, list(results))


def plot_signal(path: Path, rows: list[dict], scorers: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from noisevalue.experiments.figures import save_figure

    fig, ax = plt.subplots(figsize=(6.5, 4), dpi=120)
    centres = [(b + 0.5) / TIME_BINS for b in range(TIME_BINS)]
    for name in scorers:
        mine = [r for r in rows if r["scorer"] == name and r["t"] != "all"]
        ys = [r["spearman"] for r in mine]
        errs = [0.0 if math.isnan(r["spearman_ci95"]) else r["spearman_ci95"] for r in mine]
        ax.errorbar(centres, ys, yerr=errs, marker="o", capsize=3, label=name)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xlabel("timestep t / T")
    ax.set_ylabel("Spearman(scores, oracle alignment)")
    ax.set_title("rank agreement with the oracle, per timestep bin (95% CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
