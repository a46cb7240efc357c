"""Result tables of continuation runs (the paper's Tables 1, 2 and 4), one per metric: the
metric per row at each evaluation step after the start, as markdown, CSV, a forest plot of
the differences from the reference and a plot of the curves.

The first metric is the primary one: the held-out denoising loss when the runs report it
(a fixed, paired evaluation set: no sampling noise), then the sample-based ones (FID or the
digits feature distance, KID).

With several seeds a cell is the mean and the half-width of its 95% confidence interval
(Student t), and every row is compared with the reference row (vanilla training in the
protocol) seed by seed (:mod:`.paired`). For the last step the table gives the mean paired
difference, its 95% interval, the p-value of the paired t-test (Welch's for rows without
shared seeds) and the minimum detectable effect. All the tests of one page (every metric,
row and reference) are one family: their p-values are also given adjusted by Holm and by
Benjamini-Hochberg over that family, and the verdict uses Holm's. With one seed the table
says that nothing can be told.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from noisevalue.checkpoint import atomic_write_text
from noisevalue.experiments.figures import plot, plot_curves
from noisevalue.experiments.paired import (
    ALPHA,
    POWER,
    PairedDifference,
    benjamini_hochberg,
    holm,
    mean_ci,
    p_value,
    paired_difference,
)
from noisevalue.experiments.results import ResultTable, Row, Run
from noisevalue.train import metric_protocol as mp
from noisevalue.train.metric_protocol import ROW_KEY

PRIMARY = "heldout_loss"
HIGHER_IS_BETTER: frozenset[str] = frozenset()  # every metric reported so far is lower-is-better


def metric_names(evaluations: Iterable[dict]) -> list[str]:
    """The metrics in evaluation rows, primary first: the held-out loss, then the others in
    name order (the training-image and shuffled-pixel baselines are not results)."""
    names = {k for row in evaluations for k in row if k not in ("step", ROW_KEY) and not k.startswith("baseline")}
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
                                  lower_is_better=metric not in HIGHER_IS_BETTER, also_against=tuple(also_against),
                                  protocol_note=protocol_note(metric, runs)))
    return tables


def protocol_note(metric: str, runs: Sequence[Run]) -> str | None:
    """One line when the runs' values of ``metric`` were computed under more than one
    protocol (:mod:`noisevalue.train.metric_protocol`): what differs. None when they agree
    (or record none)."""
    seen: dict[str, dict] = {}
    for run in runs:
        for row in [*([run.start] if run.start else []), *run.history]:
            protocol = (row.get(ROW_KEY) or {}).get(metric)
            if isinstance(protocol, dict):
                seen.setdefault(mp.digest(protocol), protocol)
    if len(seen) < 2:
        return None
    keys = mp.differences(list(seen.values()))
    shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
    return (f"**{metric} was computed under {len(seen)} different protocols in these runs (they differ in "
            f"{shown}): its values are not comparable side by side.**")


# ------------------------------------------------------------------------- the family
@dataclass
class Comparison:
    """One test: ``row`` against ``reference`` at the table's last step, ``paired`` over the
    shared seeds when there are at least two; ``p`` is the paired t-test's, else Welch's, and
    None when either side has fewer than two values."""

    table: ResultTable
    reference: Row
    row: Row
    step: int
    paired: PairedDifference | None
    p: float | None


def comparisons(table: ResultTable) -> list[Comparison]:
    """The table's tests: every other row against the reference, then against each row of
    ``also_against``, at the last step; none when the table has fewer than two seeds."""
    if len(table.seeds) < 2 or not table.steps:
        return []
    last = table.steps[-1]
    found = []
    for label in (table.reference, *table.also_against):
        ref = table.reference_row(label)
        if ref is None:
            continue
        for r in table.rows:
            if r is not ref:
                a, b = ref.values.get(last, {}), r.values.get(last, {})
                d = paired_difference(a, b)
                found.append(Comparison(table, ref, r, last, d, d.p if d is not None else p_value(a, b)))
    return found


@dataclass
class Family:
    """The tests of one page (every table's :func:`comparisons` that has a p-value),
    corrected for multiplicity together: Holm's adjusted p-values (family-wise error rate)
    and Benjamini-Hochberg's (false discovery rate), in the order of ``tests``."""

    tests: list[Comparison]
    holm: list[float]
    bh: list[float]

    def adjusted(self, c: Comparison) -> tuple[float, float] | None:
        """(Holm, BH) of a test of the family; None for one outside it (not testable)."""
        for t, h, q in zip(self.tests, self.holm, self.bh, strict=True):
            if t.table is c.table and t.reference is c.reference and t.row is c.row:
                return h, q
        return None

    def line(self) -> str:
        """What was corrected, in one line."""
        groups: list[tuple[ResultTable, int]] = []  # (table, tests against one reference)
        for i, c in enumerate(self.tests):
            previous = self.tests[i - 1] if i else None
            if previous is not None and previous.table is c.table and previous.reference is c.reference:
                groups[-1] = (c.table, groups[-1][1] + 1)
            else:
                groups.append((c.table, 1))
        tables: list[ResultTable] = []
        for t, _ in groups:
            if not any(t is u for u in tables):
                tables.append(t)
        metrics = len({t.metric for t in tables})
        what = _count(metrics, "metric")
        if len(tables) != metrics:
            what = f"{_count(len(tables), 'table')} ({what})"
        runs = {k for _, k in groups}
        references = {sum(1 for g in groups if g[0] is t) for t in tables}
        if len(runs) == 1 and len(references) == 1:
            what += f" x {_count(min(runs), 'run')}"
            what += f" x {min(references)} references" if min(references) > 1 else ""
        else:
            what += f", {min(runs)}-{max(runs)} runs per table and reference"
        steps = sorted({c.step for c in self.tests})
        when = f"at +{steps[0]}" if len(steps) == 1 else "each at its table's last step"
        welch = sum(c.paired is None for c in self.tests)
        n = len(self.tests)
        tests = _count(n, "paired test") if not welch else f"{_count(n, 'test')} ({welch} unpaired: Welch's)"
        return f"Holm and Benjamini-Hochberg over the {tests} on this page: {what} {when}."


def page_family(tables: Sequence[ResultTable]) -> Family:
    """The family of a page holding ``tables``: the tests of all of them at once."""
    tests = [c for t in tables for c in comparisons(t) if c.p is not None and not math.isnan(c.p)]
    pvalues = [c.p for c in tests if c.p is not None]
    return Family(tests, holm(pvalues), benjamini_hochberg(pvalues))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


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


def page_markdown(tables: Sequence[ResultTable], heading: str = "") -> str:
    """A page: ``heading``, a section per table, and the line saying over which tests the
    p-values were adjusted (all of the page's: :func:`page_family`)."""
    family = page_family(tables)
    text = heading + "\n".join(markdown(t, family) for t in tables)
    return text + (f"\n{family.line()}\n" if family.tests else "")


def markdown(table: ResultTable, family: Family | None = None) -> str:
    """One table's section. Its adjusted p-values come from the ``family`` of its page; when
    None, the table is a page of its own and ends with the family's line."""
    own = family is None
    family = page_family([table]) if family is None else family
    steps = table.steps
    same_origin = len({r.origin for r in table.rows}) <= 1
    origin = table.rows[0].origin if table.rows else 0
    better = "lower" if table.lower_is_better else "higher"
    head = ["run"] + (["from step"] if not same_origin else []) + [
        f"start (step {origin})" if same_origin else "start"
    ] + [f"+{s}" for s in steps]
    lines = [f"{table.title}: {table.metric} ({better} is better)", ""]
    if table.protocol_note:
        lines += [table.protocol_note, ""]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in table.rows:
        cells = [r.label] + ([str(r.origin)] if not same_origin else []) + [_cell(r.start)]
        cells += [_cell(r.values.get(s, {})) for s in steps]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", *significance_lines(table, family)]
    if own and family.tests:
        lines += ["", family.line()]
    return "\n".join(lines) + "\n"


def significance_lines(table: ResultTable, family: Family) -> list[str]:
    seeds = table.seeds
    if len(seeds) < 2:
        return [f"One seed ({seeds[0] if seeds else '-'}): no confidence interval, and no difference "
                "can be called significant; run several with select.seeds=[0,1,2]."]
    lines = [f"Seeds {seeds}; cells are mean ± half-width of the 95% confidence interval."]
    tests = comparisons(table)
    references: list[Row] = []
    for c in tests:
        if not any(c.reference is r for r in references):
            references.append(c.reference)
    for ref in references:
        lines += difference_lines(table, [c for c in tests if c.reference is ref], family)
    return lines


def difference_lines(table: ResultTable, tests: list[Comparison], family: Family) -> list[str]:
    """The paired-difference table of ``tests``, all against one reference row."""
    ref, last = tests[0].reference, tests[0].step
    sign = "negative" if table.lower_is_better else "positive"
    lines = [
        "",
        f"Paired difference from '{ref.label}' at +{last} (run minus reference, per seed; {sign} is "
        f"better). MDE: the smallest true difference these seeds detect with {POWER:.0%} power at "
        f"p < {ALPHA}, from the observed spread of the differences. p (Holm), p (BH): p adjusted over "
        f"all the tests of this page (see its last line); the verdict is Holm's at {ALPHA}.",
        "",
        "| run | seeds | difference | 95% CI | relative | p | p (Holm) | p (BH) | MDE (80% power) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in tests:
        adjusted = family.adjusted(c)
        p = "n/a" if c.p is None else f"{c.p:.3g}"
        holm_p, bh_p = ("n/a", "n/a") if adjusted is None else (f"{adjusted[0]:.3g}", f"{adjusted[1]:.3g}")
        d = c.paired
        if d is None:
            lines.append(f"| {c.row.label} | unpaired | - | - | - | {p} | {holm_p} | {bh_p} | - | "
                         f"{_verdict(c, adjusted, table)} |")
            continue
        lines.append(
            f"| {c.row.label} | {d.n} | {_signed(d.mean)} | [{_signed(d.low)}, {_signed(d.high)}] | "
            f"{_pct(d.mean, d.reference_mean)} | {p} | {holm_p} | {bh_p} | "
            f"{_num(d.mde)} ({_pct(d.mde, d.reference_mean)[1:]}) | {_verdict(c, adjusted, table)} |"
        )
    return lines


def _signed(x: float) -> str:
    return ("+" if x >= 0 else "") + _num(x)


def _verdict(c: Comparison, adjusted: tuple[float, float] | None, table: ResultTable) -> str:
    if c.p is None or adjusted is None:
        return "not testable"
    if adjusted[0] < ALPHA:
        better = None if c.paired is None else (c.paired.mean < 0) == table.lower_is_better
        return "significant after Holm" + ("" if better is None else (", better" if better else ", worse"))
    if c.p < ALPHA:
        return f"not significant (p < {ALPHA} unadjusted only)"
    return "not significant"


# -------------------------------------------------------------------------------- CSV
CSV_FIELDS = ["run", "metric", "step", "seed", "value", "ci95", "p_vs_reference",
              "diff_vs_reference", "diff_ci_low", "diff_ci_high", "mde80", "p_holm", "p_bh"]


def csv_text(tables: Sequence[ResultTable]) -> str:
    """One line per table, row, step and seed (the start as step +0), plus a summary line
    (seed ``mean``) per row and step with the 95% half-width and, against the reference,
    the p-value, the mean paired difference, its 95% interval and the detectable effect;
    at the last step also the p-value adjusted by Holm and by Benjamini-Hochberg over the
    family of the page holding ``tables`` (:func:`page_family`)."""
    family = page_family(tables)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(CSV_FIELDS)
    for table in tables:
        ref = table.reference_row()
        tests = {c.row.label: c for c in comparisons(table) if c.reference is ref}
        for r in table.rows:
            for rel, values in [(0, r.start), *sorted(r.values.items())]:
                for seed, v in sorted(values.items()):
                    w.writerow([r.label, table.metric, r.origin + rel, seed, v] + [""] * 8)
                if len(values) > 1:
                    mean, half = mean_ci(list(values.values()))
                    tail: list = [""] * 7
                    if ref is not None and r is not ref and rel:
                        ref_values = ref.values.get(rel, {})
                        p = p_value(ref_values, values)
                        d = paired_difference(ref_values, values)
                        c = tests.get(r.label)
                        adjusted = family.adjusted(c) if c is not None and c.step == rel else None
                        tail = ["" if p is None else p] + (
                            ["", "", "", ""] if d is None else [d.mean, d.low, d.high, d.mde]) + (
                            ["", ""] if adjusted is None else list(adjusted))
                    w.writerow([r.label, table.metric, r.origin + rel, "mean", mean, half, *tail])
    return buf.getvalue()


def write_tables(tables: Sequence[ResultTable], root: Path, stem: str,
                 heading: str = "") -> tuple[Path, Path, Path, Path]:
    """``<stem>.md`` (a section per table, after ``heading``), ``<stem>.csv``, ``<stem>.png``
    (the forest plot of the differences from the reference) and ``<stem>_curves.png`` (the
    metrics against steps) under ``root``; returns their paths."""
    root.mkdir(parents=True, exist_ok=True)
    md, csv_path = root / f"{stem}.md", root / f"{stem}.csv"
    png, curves = root / f"{stem}.png", root / f"{stem}_curves.png"
    atomic_write_text(md, page_markdown(tables, heading))
    atomic_write_text(csv_path, csv_text(tables))
    plot(tables, png)
    plot_curves(tables, curves)
    return md, csv_path, png, curves
