"""The shape both trainers share, after torchtune's recipes: ``setup`` builds everything
and restores a checkpoint, ``train`` runs the loop and calls ``save_checkpoint``,
``evaluate`` scores the result, ``cleanup`` closes writers. :meth:`Trainer.run` calls them
in that order; only rank 0 logs and writes.
"""

from __future__ import annotations

from pathlib import Path

import torch

from noisevalue import checkpoint as ckpt
from noisevalue.config import Recipe
from noisevalue.distributed import DistInfo, broadcast_object
from noisevalue.errors import CheckpointError, UserError
from noisevalue.train.run_log import RunLog


def use_threads(recipe: Recipe, device: torch.device) -> None:
    """``train.threads`` torch threads when running on the CPU (unset: torch's default)."""
    if recipe.train.threads and device.type == "cpu":
        torch.set_num_threads(recipe.train.threads)


class Trainer:
    """One run of a recipe in ``run_dir`` on this rank (``resume``: continue from the newest
    checkpoint in ``run_dir/checkpoints``)."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, info: DistInfo, resume: bool = False):
        self.recipe, self.info, self.resume = recipe, info, resume
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / "checkpoints"
        self.step = 0
        self.skipped = 0  # steps skipped for a non-finite loss or gradient (train.nonfinite=skip)
        self.log = RunLog()  # replaced by a writing one at the end of setup

    def setup(self) -> None:
        raise NotImplementedError

    def train(self) -> None:
        raise NotImplementedError

    def save_checkpoint(self) -> None:
        raise NotImplementedError

    def evaluate(self) -> dict[str, float]:
        return {}

    def cleanup(self) -> None:
        self.log.close()

    def run(self) -> dict[str, float]:
        """setup, train, evaluate; cleanup always. Returns the final metrics."""
        if self.info.is_main:  # what a killed run left half-written or unpruned
            ckpt.remove_leftovers(self.ckpt_dir)
            ckpt.prune(self.ckpt_dir, *self.retention())
        try:
            self.setup()
            self.train()
            return self.evaluate()
        finally:
            self.cleanup()

    def skip_or_stop(self, step: int, what: str, label: str, hint: str) -> None:
        """A non-finite step (``what``, at ``step``): skip it (``train.nonfinite: skip``, at
        most ``train.max_skips`` times), or save the ``label`` weights from before it (unless
        saved already) and stop with one line naming them and a ``hint``."""
        r = self.recipe
        if r.train.nonfinite == "skip" and self.skipped < r.train.max_skips:
            self.skipped += 1
            return
        if self.newest_step() != step:
            self.save_checkpoint()  # the weights before this step: finite, the last good ones
        last = ckpt.latest_checkpoint(self.ckpt_dir)
        skipped = f" after skipping {self.skipped} step(s)" if self.skipped else ""
        raise UserError(
            f"{what} {step + 1}{skipped}; stopped. The last good {label} (after step {step}) are in '{last}'. {hint}"
        )

    def newest_step(self) -> int | None:
        """The step of this run's newest checkpoint (None: none yet), as rank 0 finds it: a
        rank that looked itself could see the checkpoint rank 0 is publishing right now, and
        take another path through the collectives than the others."""
        latest = ckpt.latest_checkpoint(self.ckpt_dir) if self.info.is_main else None
        return broadcast_object(ckpt.read_meta(latest).step if latest is not None else None, self.info)

    def retention(self) -> tuple[int | None, int | None]:
        """(checkpoints kept, multiples never pruned): ``train.keep_checkpoints`` and ``train.keep_every``."""
        return self.recipe.train.keep_checkpoints, self.recipe.train.keep_every

    # ------------------------------------------------------------------ shared plumbing
    def set_threads(self) -> None:
        use_threads(self.recipe, self.info.device)

    def open_log(self) -> None:
        """The run's TensorBoard and ``scalars.jsonl`` writer, from the current step."""
        self.log = RunLog(self.run_dir, self.info.is_main, self.step, self.recipe)

    def log_scalars(self, scalars: dict[str, float]) -> None:
        self.log.scalars(scalars, self.step)

    def checkpoint_to_resume(self) -> Path:
        """The newest checkpoint of this run, which ``--resume`` continues from."""
        path = ckpt.latest_checkpoint(self.ckpt_dir)
        if path is None:
            raise CheckpointError(f"--resume: no checkpoint in '{self.ckpt_dir}'")
        return path
