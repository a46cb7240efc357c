"""The data of the result tables: a continuation run's evaluations (:class:`Run`), and a
table's rows per metric (:class:`Row`, :class:`ResultTable`). The statistics, markdown and
CSV are :mod:`.tables`; the figures :mod:`.figures`."""

from __future__ import annotations

from dataclasses import dataclass, field


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
    protocol_note: str | None = None  # the rows' values were computed under different protocols

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
