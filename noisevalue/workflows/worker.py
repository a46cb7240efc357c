"""Entry point of each process started by ``torch.distributed.run``.

The CLI has already validated the recipe and written it, resolved, to ``RUN_DIR/recipe.yaml``;
every rank reads that file, so all ranks run exactly the same settings.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from noisevalue.errors import UserError

if TYPE_CHECKING:
    from noisevalue.distributed import DistInfo

JOB = "job.json"  # an experiment command and its options (ablate, transfer, analyze)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisevalue-worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--job", action="store_true", help=f"run the experiment in RUN_DIR/{JOB}")
    args = parser.parse_args(argv)
    from noisevalue.config import RESOLVED_RECIPE, load_recipe
    from noisevalue.workflows.dispatch import run_workflow

    def prepare() -> tuple[str, Callable[[DistInfo], object]]:
        recipe = load_recipe(Path(args.run_dir) / RESOLVED_RECIPE)

        def body(info: DistInfo) -> None:
            if args.job:
                import json

                from noisevalue.workflows.experiments import run_experiment

                job = json.loads((Path(args.run_dir) / JOB).read_text())
                run_experiment(job["command"], recipe, info, job["options"])
            else:
                run_workflow(recipe, args.run_dir, info, resume=args.resume)

        return recipe.train.device, body

    return run_rank(prepare)


def run_rank(prepare: Callable[[], tuple[str, Callable[[DistInfo], object]]]) -> int:
    """One rank: ``prepare()`` gives the device and the work; joins the process group, does
    the work, and always leaves the group. A user error (in ``prepare`` too) is printed as one
    line and its exit code returned."""
    from noisevalue import distributed

    info = None
    try:
        device, body = prepare()
        info = distributed.init(device)
        body(info)
    except UserError as exc:
        print(f"noisevalue: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if info is not None:
            distributed.cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
