"""A rich progress bar with ETA for step loops; silent on non-main ranks."""

from __future__ import annotations

from typing import Any


class StepProgress:
    def __init__(self, label: str, total: int, start: int = 0, enabled: bool = True) -> None:
        self.label, self.total, self.start, self.enabled = label, total, start, enabled
        self._progress: Any = None
        self._task: Any = None

    def __enter__(self) -> StepProgress:
        if self.enabled:
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
            self._task = self._progress.add_task(
                self.label, total=self.total, completed=self.start, status=""
            )
        return self

    def advance(self, **status: float) -> None:
        if self._progress is not None:
            text = " ".join(f"{k} {v:.4f}" for k, v in status.items())
            self._progress.update(self._task, advance=1, status=text)

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.__exit__(*exc)
