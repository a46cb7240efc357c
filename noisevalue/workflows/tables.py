"""Result tables of continuation runs (the paper's Tables 1, 2 and 4): a metric per row at
each evaluation step after the start, as markdown, CSV and a PNG plot.

With several seeds a cell is the mean and the half-width of its 95% confidence interval
(Student t), and each row is tested against the reference row at every step: a paired
t-test over the seeds both rows share (same seed = same data order and candidate noises),
else Welch's t-test. With one seed the table says that nothing can be called significant.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from noisevalue.checkpoint import atomic_file, atomic_write_text

ALPHA = 0.05


@dataclass
class Row:
    """One row: its start (step, value per seed) and values per step after the start and seed."""

    label: str
    origin: int
    start: dict[int, float] = field(default_factory=dict)
    values: dict[int, dict[int, float]] = field(default_factory=dict)  # +step -> seed -> value

    def add(self, seed: int, rows: list[dict], metric: str) -> None:
        """Add one run's evaluation rows (``{"step": ..., metric: ...}``, absolute steps)."""
        for h in rows:
            if h.get(metric) is not None:
                self.values.setdefault(h["step"] - self.origin, {})[seed] = float(h[metric])


@dataclass
class ResultTable:
    title: str
    metric: str
    rows: list[Row]
    reference: str | None = None  # label of the row the others are tested against
    lower_is_better: bool = True

    @property
    def steps(self) -> list[int]:
        return sorted({s for r in self.rows for s in r.values})

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for r in self.rows for v in r.values.values() for seed in v})


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the two-sided Student-t interval); the width is nan for n < 2."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return mean, float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)


def p_value(reference: dict[int, float], other: dict[int, float]) -> float | None:
    """Two-sided p-value of a difference in means: paired over shared seeds when there are
    at least two, else Welch's test; None when either side has fewer than two values."""
    from scipy import stats

    shared = sorted(reference.keys() & other.keys())
    if len(shared) >= 2:
        a = [reference[s] for s in shared]
        b = [other[s] for s in shared]
        if all(x == y for x, y in zip(a, b, strict=True)):
            return 1.0
        return float(stats.ttest_rel(a, b).pvalue)
    if len(reference) >= 2 and len(other) >= 2:
        return float(stats.ttest_ind(list(reference.values()), list(other.values()), equal_var=False).pvalue)
    return None


def _cell(values: dict[int, float]) -> str:
    if not values:
        return "-"
    mean, half = mean_ci(list(values.values()))
    return f"{mean:.3f}" if math.isnan(half) else f"{mean:.3f} ± {half:.3f}"


def markdown(table: ResultTable) -> str:
    steps = table.steps
    same_origin = len({r.origin for r in table.rows}) <= 1
    origin = table.rows[0].origin if table.rows else 0
    better = "lower" if table.lower_is_better else "higher"
    head = ["run"] + (["from step"] if not same_origin else []) + [
        f"start (step {origin})" if same_origin else "start"
    ] + [f"+{s}" for s in steps]
    lines = [f"{table.title}: {table.metric} ({better} is better)", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [r.label] + ([str(r.origin)] if not same_origin else []) + [_cell(r.start)]
        cells += [_cell(r.values.get(s, {})) for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *significance_lines(table)]
    return "\n".join(lines) + "\n"


def significance_lines(table: ResultTable) -> list[str]:
    seeds = table.seeds
    if len(seeds) < 2:
        return [f"One seed ({seeds[0] if seeds else '-'}): no confidence interval, and no difference "
                "can be called significant; run several with select.seeds=[0,1,2]."]
    lines = [f"Seeds {seeds}; cells are mean ± half-width of the 95% confidence interval."]
    ref = next((r for r in table.rows if r.label == table.reference), None)
    if ref is None or not table.steps:
        return lines
    last = table.steps[-1]
    lines.append(f"Difference from '{ref.label}' (t-test over seeds, significant at p < {ALPHA}):")
    for r in table.rows:
        if r is ref:
            continue
        parts = []
        for s in table.steps:
            p = p_value(ref.values.get(s, {}), r.values.get(s, {}))
            parts.append(f"+{s}: " + ("n/a" if p is None else f"p={p:.3g}{' *' if p < ALPHA else ''}"))
        p_last = p_value(ref.values.get(last, {}), r.values.get(last, {}))
        verdict = "not testable" if p_last is None else ("significant" if p_last < ALPHA else "not significant")
        lines.append(f"- {r.label}: {', '.join(parts)} -> at +{last} {verdict}")
    return lines


def csv_text(table: ResultTable) -> str:
    """One line per row, step and seed (the start as step +0), plus a summary line per
    row and step (seed ``mean``) with the 95% half-width and the p-value against the reference."""
    ref = next((r for r in table.rows if r.label == table.reference), None)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["run", "step", "seed", table.metric, "ci95", "p_vs_reference"])
    for r in table.rows:
        for rel, values in [(0, r.start), *sorted(r.values.items())]:
            for seed, v in sorted(values.items()):
                w.writerow([r.label, r.origin + rel, seed, v, "", ""])
            if len(values) > 1:
                mean, half = mean_ci(list(values.values()))
                p = p_value(ref.values.get(rel, {}), values) if ref is not None and r is not ref and rel else None
                w.writerow([r.label, r.origin + rel, "mean", mean, half, "" if p is None else p])
    return buf.getvalue()


def write_table(table: ResultTable, root: Path, stem: str) -> tuple[Path, Path, Path]:
    """``<stem>.md``, ``<stem>.csv`` and ``<stem>.png`` under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = root / f"{stem}.md", root / f"{stem}.csv", root / f"{stem}.png"
    atomic_write_text(md, markdown(table))
    atomic_write_text(csv_path, csv_text(table))
    plot(table, png)
    return md, csv_path, png


def plot(table: ResultTable, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for r in table.rows:
        points = [(0, r.start)] if r.start else []
        points += [(s, v) for s, v in sorted(r.values.items()) if v]
        xs = [s for s, _ in points]
        stats = [mean_ci(list(v.values())) for _, v in points]
        ys = [m for m, _ in stats]
        errs = [0.0 if math.isnan(h) else h for _, h in stats]
        ax.errorbar(xs, ys, yerr=errs if any(errs) else None, marker="o", capsize=3, label=r.label)
    ax.set_xlabel("steps after the start")
    ax.set_ylabel(table.metric)
    ax.set_title(table.title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig: object, path: Path) -> None:
    """Save a matplotlib figure atomically (a crash never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp)  # type: ignore[attr-defined]
    finally:
        plt.close(fig)  # type: ignore[arg-type]
