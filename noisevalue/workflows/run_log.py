"""TensorBoard events of one run: written by rank 0 only, a no-op on the other ranks."""

from __future__ import annotations

from pathlib import Path
from typing import Any


class RunLog:
    def __init__(self, run_dir: Path | None = None, enabled: bool = False, start_step: int = 0) -> None:
        self.writer: Any = None
        if enabled and run_dir is not None:
            from torch.utils.tensorboard import SummaryWriter

            # a resumed run drops events past its checkpoint, so curves have no doubled steps
            self.writer = SummaryWriter(str(run_dir / "tb"), purge_step=start_step or None)

    def scalars(self, scalars: dict[str, float], step: int) -> None:
        if self.writer is not None:
            for k, v in scalars.items():
                self.writer.add_scalar(k, v, step)
            self.writer.flush()

    def image(self, tag: str, image: Any, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
