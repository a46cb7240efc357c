"""The figures of the result tables (:mod:`.tables`): the forest plot of each table's
differences from its reference at the last step, the metrics against steps, and
:func:`save_figure`, which every figure of the experiments goes through."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from noisevalue.checkpoint import atomic_file
from noisevalue.experiments.paired import mean_ci, paired_difference, welch_difference
from noisevalue.experiments.results import ResultTable


@dataclass
class ForestRow:
    label: str
    mean: float
    low: float  # the 95% interval; nan without one (a single pair or a single value)
    high: float


@dataclass
class ForestPanel:
    """A table's differences from its reference at the last step, in % of the reference
    mean when every row is paired with the reference by seed, else in the metric's units."""

    title: str
    metric: str
    reference: str
    step: int
    relative: bool
    lower_is_better: bool
    rows: list[ForestRow]

    @property
    def xlabel(self) -> str:
        unit = ", % of its mean" if self.relative else ""
        sign = "negative" if self.lower_is_better else "positive"
        return f"difference from {self.reference} at +{self.step}{unit} ({sign} is better)"


def forest_panel(table: ResultTable) -> ForestPanel | None:
    """Per row other than the reference: the mean paired difference and its 95% interval
    (:func:`~noisevalue.experiments.paired.paired_difference`); with a single shared seed
    the one difference, without an interval; without shared seeds the difference of the
    means with Welch's interval (or none), labelled "(unpaired)". None without a reference
    row or steps."""
    ref = table.reference_row()
    if ref is None or not table.steps:
        return None
    last = table.steps[-1]
    a = ref.values.get(last, {})
    found: list[tuple[ForestRow, float | None]] = []  # with the reference mean of a paired row
    for r in table.rows:
        b = r.values.get(last, {})
        if r is ref or not a or not b:
            continue
        shared = sorted(a.keys() & b.keys())
        d = paired_difference(a, b)
        welch = welch_difference(a, b) if d is None else None
        if d is not None:
            found.append((ForestRow(r.label, d.mean, d.low, d.high), d.reference_mean))
        elif welch is not None:
            found.append((ForestRow(f"{r.label} (unpaired)", *welch), None))
        elif len(shared) == 1:
            s = shared[0]
            found.append((ForestRow(r.label, b[s] - a[s], math.nan, math.nan), a[s]))
        else:
            mean = sum(b.values()) / len(b) - sum(a.values()) / len(a)
            found.append((ForestRow(f"{r.label} (unpaired)", mean, math.nan, math.nan), None))
    relative = bool(found) and all(m is not None and m != 0 for _, m in found)
    rows = [ForestRow(row.label, *(100 * x / m for x in (row.mean, row.low, row.high)))  # type: ignore[operator]
            if relative else row for row, m in found]
    return ForestPanel(table.title, table.metric, ref.label, last, relative, table.lower_is_better, rows)


def _grid(n: int, width: float, height: float) -> tuple[object, list]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(max(n, 1), 3)
    rows = -(-max(n, 1) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), dpi=110, squeeze=False)
    return fig, list(axes.flat)


def _short(title: str) -> str:
    return title if len(title) < 60 else title[:57] + "..."


def plot(tables: Sequence[ResultTable], path: Path) -> None:
    """The forest plot: a panel per table (:func:`forest_panel`), a line per row from the
    low to the high end of its 95% interval through its mean, zero marked."""
    panels = [p for p in map(forest_panel, tables) if p is not None and p.rows]
    fig, axes = _grid(len(panels), 5.5, 1.6 + 0.4 * max((len(p.rows) for p in panels), default=1))
    for ax, panel in zip(axes, panels, strict=False):
        ys = list(range(len(panel.rows)))
        for y, row in zip(ys, panel.rows, strict=True):
            if not math.isnan(row.low):
                ax.plot([row.low, row.high], [y, y], color="C0", linewidth=2, solid_capstyle="butt")
            ax.plot([row.mean], [y], marker="o", color="C0")
        ax.axvline(0.0, color="0.3", linewidth=0.8, linestyle="--")
        ax.set_yticks(ys, [row.label for row in panel.rows], fontsize=8)
        ax.set_ylim(len(ys) - 0.5, -0.5)  # the first row on top, as in the table
        ax.set_xlabel(panel.xlabel, fontsize=8)
        ax.set_title(_short(f"{panel.metric}: {panel.title}"), fontsize=9)
        ax.grid(axis="x", alpha=0.3)
    if not panels:
        axes[0].text(0.5, 0.5, "no difference to show: no reference row", ha="center", va="center")
        axes[0].set_axis_off()
    for ax in axes[max(len(panels), 1):]:
        ax.set_visible(False)
    fig.tight_layout()  # type: ignore[attr-defined]
    save_figure(fig, path)


def plot_curves(tables: Sequence[ResultTable], path: Path) -> None:
    """One panel per table: mean and 95% interval per row against steps after the start."""
    fig, axes = _grid(len(tables), 5.5, 4)
    for ax, table in zip(axes, tables, strict=False):
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
        ax.set_title(_short(table.title), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axes[len(tables):]:
        ax.set_visible(False)
    fig.tight_layout()  # type: ignore[attr-defined]
    save_figure(fig, path)


def save_figure(fig: object, path: Path) -> None:
    """Save a matplotlib figure atomically (a crash never leaves half a PNG) and close it."""
    import matplotlib.pyplot as plt

    try:
        with atomic_file(path, suffix=path.suffix) as tmp:
            fig.savefig(tmp)  # type: ignore[attr-defined]
    finally:
        plt.close(fig)  # type: ignore[arg-type]
