"""Scalars of one run: TensorBoard events plus ``scalars.jsonl``, a plain log that other
commands read back (``transfer`` matches checkpoints on the training-loss curve).
Written by rank 0 only, a no-op on the other ranks."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SCALARS = "scalars.jsonl"
#: speeds and durations: they differ between two runs of the same recipe, so they are kept
#: apart from everything else a run writes, which is reproducible byte for byte
TIMINGS = "timings.jsonl"


class RunLog:
    def __init__(self, run_dir: Path | None = None, enabled: bool = False, start_step: int = 0) -> None:
        self.writer: Any = None
        self.jsonl: Path | None = None
        self.timings_jsonl: Path | None = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops events past its checkpoint, so curves have no doubled steps
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)
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
        if path is not None:
            with path.open("a") as f:
                f.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}}) + "\n")

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


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
