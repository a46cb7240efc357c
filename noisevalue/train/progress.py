"""A rich progress bar with ETA for step loops; silent on non-main ranks.

When output is not a terminal (batch jobs, CI logs) the bar is replaced by a plain line
every ``print_every`` steps, so logs still show progress and an ETA.
"""

from __future__ import annotations

import time
from typing import Any


class StepProgress:
    def __init__(
        self, label: str, total: int, start: int = 0, enabled: bool = True, print_every: int = 100
    ) -> None:
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self.print_every = print_every
        self.done = start
        self._progress: Any = None
        self._task: Any = None
        self._plain = False
        self._text = ""
        self._t0 = time.perf_counter()

    def __enter__(self) -> StepProgress:
        if not self.enabled:
            return self
        from rich.console import Console

        if not Console().is_terminal:
            self._plain = True
            return self
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[status]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
        )
        self._progress.__enter__()
        self._task = self._progress.add_task(self.label, total=self.total, completed=self.start, status="")
        return self

    def advance(self, **status: float) -> None:
        """One step done; ``status`` (e.g. the loss) shown until the next one given."""
        self.done += 1
        if status:
            self._text = " ".join(f"{k} {v:.4f}" for k, v in status.items())
        text = self._text
        if self._progress is not None:
            self._progress.update(self._task, advance=1, status=text)
        elif self._plain and (self.done % self.print_every == 0 or self.done == self.total):
            elapsed = time.perf_counter() - self._t0
            rate = (self.done - self.start) / max(elapsed, 1e-9)
            eta = (self.total - self.done) / max(rate, 1e-9)
            print(f"{self.label} {self.done}/{self.total} {text} "
                  f"{elapsed:.0f}s elapsed, eta {eta:.0f}s", flush=True)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
