"""Entry point of each process started by ``torch.distributed.run``.

The CLI has already validated the recipe and written it, resolved, to ``RUN_DIR/recipe.yaml``;
every rank reads that file, so all ranks run exactly the same settings.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from noisevalue.errors import UserError

RESOLVED_RECIPE = "recipe.yaml"
JOB = "job.json"  # an experiment command and its options (ablate, transfer, analyze)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="noisevalue-worker")
    parser.add_argument("--run-dir", required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--job", action="store_true", help=f"run the experiment in RUN_DIR/{JOB}")
    args = parser.parse_args(argv)
    from noisevalue import distributed
    from noisevalue.config import load_recipe
    from noisevalue.workflows import run_workflow

    info = None
    try:
        recipe = load_recipe(Path(args.run_dir) / RESOLVED_RECIPE)
        info = distributed.init(recipe.train.device)
        if args.job:
            import json

            from noisevalue.workflows.experiments import run_experiment

            job = json.loads((Path(args.run_dir) / JOB).read_text())
            run_experiment(job["command"], recipe, info, job["options"])
        else:
            run_workflow(recipe, args.run_dir, info, resume=args.resume)
    except UserError as exc:
        print(f"noisevalue: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if info is not None:
            distributed.cleanup(info)
    return 0


if __name__ == "__main__":
    sys.exit(main())
