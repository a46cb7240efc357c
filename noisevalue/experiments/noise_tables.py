"""What each method's selection did to the training noise, from the ``noise_stats.json`` its
continuations wrote (:mod:`noisevalue.train.noise_stats`): per method and timestep bin, the
noise's norm against the chi mean, its PIT against the chi CDF and its per-coordinate
variance, each beside the value i.i.d. Gaussian noise gives, and the oracle's first-order
gain of its pick over candidate 0.

Seeds are pooled: a cell is the count-weighted mean of the seeds' figures (every seed trains
the same number of samples per step, so each seed counts alike).

Writes ``<stem>_noise.md`` and ``<stem>_noise.csv`` beside the result tables.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path

from noisevalue.checkpoint import atomic_write_text
from noisevalue.train import noise_stats as ns

#: (key in noise_stats.json, heading, value for i.i.d. Gaussian noise)
FIGURES = [
    ("norm_ratio", "norm / E[chi_d]", "1"),
    ("pit_mean", "mean of F_chi_d(norm) (PIT)", "0.5; a top-1 of k by norm: 1/(k+1) or k/(k+1)"),
    ("coord_var_mean", "per-coordinate variance (mean over coordinates)", "1"),
    ("gain", "first-order gain of the pick over candidate 0 (selectors that report it)", "0"),
]
CSV_FIELDS = ["run", "seed", "bin", "t_from", "t_to", "count", "norm_ratio", "pit_mean", "pit_var",
              "coord_var_mean", "coord_var_min", "coord_var_max", "gain"]


def read(run_dir: Path) -> dict | None:
    path = run_dir / ns.FILE
    return json.loads(path.read_text()) if path.is_file() else None


def pooled(stats: Sequence[dict], key: str) -> float | None:
    """The count-weighted mean of ``key`` over seeds' cells that have it."""
    cells = [(c["count"], c[key]) for c in stats if c.get("count") and key in c]
    total = sum(n for n, _ in cells)
    return sum(n * v for n, v in cells) / total if total else None


def bin_edges(num_timesteps: int) -> list[tuple[int, int]]:
    """The timestep range ``[lo, hi]`` of each bin (``t * BINS // T``)."""
    edges = []
    for b in range(ns.BINS):
        lo = -(-b * num_timesteps // ns.BINS)
        hi = -(-(b + 1) * num_timesteps // ns.BINS) - 1
        edges.append((lo, hi))
    return edges


def noise_markdown(runs: dict[str, dict[int, dict]], num_timesteps: int, steps: int) -> str:
    """Per figure, a table: a row per method (seeds pooled), a column per timestep bin and
    one over all of them. ``runs``: label -> seed -> a ``noise_stats.json``."""
    edges = bin_edges(num_timesteps)
    seeds = sorted({s for per in runs.values() for s in per})
    lines = [f"What selection did to the training noise over the {steps} steps of each continuation "
             f"(seeds {seeds} pooled), per timestep bin.", ""]
    for key, heading, gaussian in FIGURES:
        rows = []
        for label, per_seed in runs.items():
            stats = list(per_seed.values())
            cells = [pooled([s["per_bin"][b] for s in stats], key) for b in range(ns.BINS)]
            total = pooled([s["all"] for s in stats], key)
            if total is not None:
                rows.append(f"| {label} | " + " | ".join("-" if c is None else f"{c:.4g}" for c in cells)
                            + f" | {total:.4g} |")
        if not rows:
            continue
        lines += [f"{heading} (i.i.d. Gaussian noise: {gaussian})", "",
                  "| run | " + " | ".join(f"t {lo}-{hi}" for lo, hi in edges) + " | all |",
                  "|" + "---|" * (ns.BINS + 2), *rows, ""]
    return "\n".join(lines)


def noise_csv(runs: dict[str, dict[int, dict]], num_timesteps: int) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    edges = bin_edges(num_timesteps)
    for label, per_seed in runs.items():
        for seed, stats in sorted(per_seed.items()):
            cells = [(str(b), *edges[b], stats["per_bin"][b]) for b in range(ns.BINS)]
            for b, lo, hi, cell in [*cells, ("all", 0, num_timesteps - 1, stats["all"])]:
                w.writerow([label, seed, b, lo, hi, cell.get("count", 0),
                            *(cell.get(k, "") for k in CSV_FIELDS[6:])])
    return buf.getvalue()


def write_noise_tables(run_dirs: dict[str, dict[int, Path]], root: Path, stem: str, num_timesteps: int,
                       steps: int) -> list[Path]:
    """``<stem>_noise.md`` and ``.csv`` from the runs (label -> seed -> folder) that wrote
    their noise diagnostics; nothing when none did (runs from before they existed)."""
    runs = {label: found for label, per_seed in run_dirs.items()
            if (found := {s: stats for s, d in per_seed.items() if (stats := read(d)) is not None})}
    if not runs:
        return []
    md, csv_path = root / f"{stem}_noise.md", root / f"{stem}_noise.csv"
    atomic_write_text(md, noise_markdown(runs, num_timesteps, steps))
    atomic_write_text(csv_path, noise_csv(runs, num_timesteps))
    return [md, csv_path]
