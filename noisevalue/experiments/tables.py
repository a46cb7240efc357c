"""Result tables of continuation runs (the paper's Tables 1, 2 and 4), one per metric: the
metric per row at each evaluation step after the start, as markdown, CSV and a PNG plot.

The first metric is the primary one: the held-out denoising loss when the runs report it
(a fixed, paired evaluation set: no sampling noise), then the sample-based ones (FID or the
digits feature distance, KID).

With several seeds a cell is the mean and the half-width of its 95% confidence interval
(Student t), and every row is compared with the reference row (vanilla training in the
protocol) seed by seed: same seed = same data order, timesteps and candidate noises, so the
paired difference removes the spread between seeds (:mod:`.paired`). For the last step the
table gives the mean paired difference, its 95% interval, the p-value of the paired t-test
and the minimum detectable effect. Rows without shared seeds fall back to Welch's t-test. With one seed the table says that nothing can be told.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from noisevalue.checkpoint import atomic_file, atomic_write_text
from noisevalue.experiments.paired import (
    ALPHA,
    POWER,
    PairedDifference,
    mean_ci,
    p_value,
    paired_difference,
)

PRIMARY = "heldout_loss"
HIGHER_IS_BETTER: frozenset[str] = frozenset()  # every metric reported so far is lower-is-better


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
    also_against: tuple[str, ...] = ()  # more rows to give paired differences from (markdown)

    @property
    def steps(self) -> list[int]:
        return sorted({s for r in self.rows for s in r.values})

    @property
    def seeds(self) -> list[int]:
        return sorted({seed for r in self.rows for v in r.values.values() for seed in v})

    def reference_row(self, label: str | None = None) -> Row | None:
        label = self.reference if label is None else label
        return next((r for r in self.rows if r.label == label), None)


@dataclass
class Run:
    """One continuation for the tables: its row label, seed, starting evaluation (or None)
    and the evaluation rows after the start."""

    label: str
    seed: int
    origin: int
    start: dict | None
    history: list[dict]


def metric_names(evaluations: Iterable[dict]) -> list[str]:
    """The metrics in evaluation rows, primary first: the held-out loss, then the others in
    name order (the training-image and shuffled-pixel baselines are not results)."""
    names = {k for row in evaluations for k in row if k != "step" and not k.startswith("baseline")}
    return sorted(names, key=lambda k: (k != PRIMARY, k))


def primary_metric(evaluations: Iterable[dict]) -> str | None:
    names = metric_names(evaluations)
    return names[0] if names else None


def tables_for(title: str, runs: Sequence[Run], reference: str | None,
               metrics: Sequence[str] | None = None, also_against: Sequence[str] = ()) -> list[ResultTable]:
    """One :class:`ResultTable` per metric (default: every metric the runs report, primary
    first), rows in the order their labels first appear in ``runs``."""
    if metrics is None:
        metrics = metric_names([row for r in runs for row in [*r.history, *([r.start] if r.start else [])]])
    tables = []
    for metric in metrics:
        rows: dict[str, Row] = {}
        for run in runs:
            row = rows.setdefault(run.label, Row(run.label, run.origin))
            if run.start is not None and run.start.get(metric) is not None:
                row.start[run.seed] = float(run.start[metric])
            row.add(run.seed, run.history, metric)
        tables.append(ResultTable(title, metric, list(rows.values()), reference,
                                  lower_is_better=metric not in HIGHER_IS_BETTER, also_against=tuple(also_against)))
    return tables


# --------------------------------------------------------------------------- markdown
def _cell(values: dict[int, float]) -> str:
    if not values:
        return "-"
    mean, half = mean_ci(list(values.values()))
    return _num(mean) if math.isnan(half) else f"{_num(mean)} ± {_num(half)}"


def _num(x: float) -> str:
    """4 significant figures beyond the leading zeros (losses ~0.05, distances ~10)."""
    if x == 0 or math.isnan(x) or math.isinf(x):
        return f"{x:.3f}"
    digits = max(3, 3 - int(math.floor(math.log10(abs(x)))))
    return f"{x:.{digits}f}"


def _pct(x: float, ref: float) -> str:
    return "-" if ref == 0 or math.isnan(x) else f"{100 * x / ref:+.2f}%"


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
    for label in (table.reference, *table.also_against):
        ref = table.reference_row(label)
        if ref is not None and table.steps:
            lines += difference_lines(table, ref)
    return lines


def difference_lines(table: ResultTable, ref: Row) -> list[str]:
    last = table.steps[-1]
    sign = "negative" if table.lower_is_better else "positive"
    lines = [
        "",
        f"Paired difference from '{ref.label}' at +{last} (run minus reference, per seed; {sign} is "
        f"better). MDE: the smallest true difference these seeds detect with {POWER:.0%} power at "
        f"p < {ALPHA}, from the observed spread of the differences.",
        "",
        "| run | seeds | difference | 95% CI | relative | p | MDE (80% power) | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.rows:
        if r is ref:
            continue
        d = paired_difference(ref.values.get(last, {}), r.values.get(last, {}))
        if d is None:
            p = p_value(ref.values.get(last, {}), r.values.get(last, {}))
            lines.append(f"| {r.label} | unpaired | - | - | - | {'n/a' if p is None else f'{p:.3g}'} | - | "
                         f"{'not testable' if p is None else _verdict(p, None, table)} |")
            continue
        lines.append(
            f"| {r.label} | {d.n} | {_signed(d.mean)} | [{_signed(d.low)}, {_signed(d.high)}] | "
            f"{_pct(d.mean, d.reference_mean)} | {d.p:.3g} | {_num(d.mde)} ({_pct(d.mde, d.reference_mean)[1:]}) | "
            f"{_verdict(d.p, d, table)} |"
        )
    return lines


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "") + _num(x)


def _verdict(p: float, d: PairedDifference | None, table: ResultTable) -> str:
    if p < ALPHA:
        better = (d.mean < 0) == table.lower_is_better if d is not None else None
        return "significant" + ("" if better is None else (", better" if better else ", worse"))
    return "not significant"


# -------------------------------------------------------------------------------- CSV
CSV_FIELDS = ["run", "metric", "step", "seed", "value", "ci95", "p_vs_reference",
              "diff_vs_reference", "diff_ci_low", "diff_ci_high", "mde80"]


def csv_text(tables: Sequence[ResultTable]) -> str:
    """One line per table, row, step and seed (the start as step +0), plus a summary line
    (seed ``mean``) per row and step with the 95% half-width and, against the reference,
    the p-value, the mean paired difference, its 95% interval and the detectable effect."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for table in tables:
        ref = table.reference_row()
        for r in table.rows:
            for rel, values in [(0, r.start), *sorted(r.values.items())]:
                for seed, v in sorted(values.items()):
                    w.writerow([r.label, table.metric, r.origin + rel, seed, v] + [""] * 6)
                if len(values) > 1:
                    mean, half = mean_ci(list(values.values()))
                    tail: list = [""] * 5
                    if ref is not None and r is not ref and rel:
                        ref_values = ref.values.get(rel, {})
                        p = p_value(ref_values, values)
                        d = paired_difference(ref_values, values)
                        tail = ["" if p is None else p] + (
                            ["", "", "", ""] if d is None else [d.mean, d.low, d.high, d.mde])
                    w.writerow([r.label, table.metric, r.origin + rel, "mean", mean, half, *tail])
    return buf.getvalue()


def write_tables(tables: Sequence[ResultTable], root: Path, stem: str, heading: str = "") -> tuple[Path, Path, Path]:
    """``<stem>.md`` (a section per table, after ``heading``), ``<stem>.csv`` and
    ``<stem>.png`` (a panel per table) under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    md, csv_path, png = root / f"{stem}.md", root / f"{stem}.csv", root / f"{stem}.png"
    atomic_write_text(md, heading + "\n".join(markdown(t) for t in tables))
    atomic_write_text(csv_path, csv_text(tables))
    plot(tables, png)
    return md, csv_path, png


# ------------------------------------------------------------------------------- plot
def plot(tables: Sequence[ResultTable], path: Path) -> None:
    """One panel per table: mean and 95% interval per row against steps after the start."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(tables), 1)
    cols = min(n, 3)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 4 * rows), dpi=110, squeeze=False)
    for ax, table in zip(axes.flat, tables, strict=False):
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
        ax.set_title(table.title if len(table.title) < 60 else table.title[:57] + "...", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(tables):]:
        ax.set_visible(False)
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
