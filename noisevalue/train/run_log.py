"""Scalars of one run: ``scalars.jsonl``, a plain log that other commands read back
(``transfer`` matches checkpoints on the training-loss curve), TensorBoard events and the
trackers of ``log.backends`` (:mod:`noisevalue.train.trackers`). Written by rank 0 only, a
no-op on the other ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from noisevalue.config import Recipe

SCALARS = "scalars.jsonl"
#: speeds and durations: they differ between two runs of the same recipe, so they are kept
#: apart from everything else a run writes, which is reproducible byte for byte
TIMINGS = "timings.jsonl"


class RunLog:
    """``recipe``: its ``log`` section picks TensorBoard and the trackers (without one,
    TensorBoard alone)."""

    def __init__(self, run_dir: Path | None = None, enabled: bool = False, start_step: int = 0,
                 recipe: Recipe | None = None) -> None:
        self.writer: Any = None
        self.trackers: list[Any] = []
        self.jsonl: Path | None = None
        self.timings_jsonl: Path | None = None
        if enabled and run_dir is not None:
            if recipe is None or "tensorboard" in recipe.log.backends:
                from torch.utils.tensorboard import SummaryWriter

                # a resumed run drops the events past its checkpoint (as scalars.jsonl drops
                # them), so curves have no doubled steps and keep the checkpoint's own
                self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step + 1 if start_step else None)
            if recipe is not None:
                from noisevalue.train.trackers import open_trackers

                self.trackers = open_trackers(recipe, run_dir, resume=start_step > 0)
            self.jsonl = run_dir / SCALARS
            self.timings_jsonl = run_dir / TIMINGS
            _truncate(self.jsonl, start_step)
            _truncate(self.timings_jsonl, start_step)

    def scalars(self, scalars: dict[str, float], step: int) -> None:
        """Values that a rerun reproduces exactly (losses, metrics, settings)."""
        self._write(self.jsonl, scalars, step)

    def timings(self, scalars: dict[str, float], step: int) -> None:
        """Speeds and durations (``timings.jsonl`` beside ``scalars.jsonl``; both in TensorBoard)."""
        self._write(self.timings_jsonl, scalars, step)

    def _write(self, path: Path | None, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()
        for tracker in self.trackers:
            tracker.scalars(scalars, step)
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)
        for tracker in self.trackers:
            tracker.image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for tracker in self.trackers:
            tracker.close()
        self.trackers = []


def _truncate(path: Path, start_step: int) -> None:
    """Drop lines past ``start_step`` (left by an interrupted run that is now resumed)."""
    if not path.is_file():
        return
    if start_step == 0:
        path.unlink()
        return
    lines = path.read_text().splitlines()
    kept = [line for line in lines if (step := _step(line)) is not None and step <= start_step]
    from noisevalue.checkpoint import atomic_write_text

    atomic_write_text(path, "".join(line + "\n" for line in kept))


def _step(line: str) -> int | None:
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None  # a line cut short by a crash


def read_scalar(run_dir: str | Path, tag: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one scalar tag in a run's ``scalars.jsonl``, in step order."""
    path = Path(run_dir) / SCALARS
    if not path.is_file():
        return [], []
    by_step: dict[int, float] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if tag in row:
            by_step[int(row["step"])] = float(row[tag])
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]
