"""The entry point of every process that ``torch.distributed.run`` starts:

    python -m noisevalue.jobs KIND FOLDER [--resume]

=============  ==========================================  ===============================
KIND           FOLDER holds (written by the CLI)           each rank runs
=============  ==========================================  ===============================
``run``        ``recipe.yaml``, validated and resolved     the recipe's workflow
``experiment`` ``recipe.yaml`` and ``job.json``            ``ablate``/``transfer``/``analyze``
``sample``     ``settings.json`` of a samples folder       its share of the images
``cache``      ``recipe.yaml`` naming its latent cache     its shards of the latent cache
=============  ==========================================  ===============================

Every rank reads the same files, so all ranks run exactly the same settings. A user error
on any rank is printed as one line and its exit code returned.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from noisevalue.errors import UserError

if TYPE_CHECKING:
    from noisevalue.distributed import DistInfo

JOB = "job.json"  # an experiment command and its options
Work = Callable[["DistInfo"], object]


def init_options(recipe: Any) -> dict[str, Any]:
    """How a process of ``recipe``'s run joins: its device, the process group's timeout and
    TF32 (the keyword arguments of :func:`noisevalue.distributed.init`)."""
    t = recipe.train
    return {"device_preference": t.device, "timeout_s": t.dist_timeout, "tf32": t.tf32}


def _run(folder: Path, resume: bool) -> tuple[dict[str, Any], Work]:
    from noisevalue.config import RESOLVED_RECIPE, load_recipe
    from noisevalue.experiments.commands import run_workflow

    recipe = load_recipe(folder / RESOLVED_RECIPE)
    return init_options(recipe), lambda info: run_workflow(recipe, folder, info, resume=resume)


def _experiment(folder: Path, resume: bool) -> tuple[dict[str, Any], Work]:
    from noisevalue.config import RESOLVED_RECIPE, load_recipe
    from noisevalue.experiments.commands import run_experiment

    recipe = load_recipe(folder / RESOLVED_RECIPE)
    job = json.loads((folder / JOB).read_text())
    return init_options(recipe), lambda info: run_experiment(job["command"], recipe, info, job["options"])


def _sample(folder: Path, resume: bool) -> tuple[dict[str, Any], Work]:
    from noisevalue.sampling.sample import read_settings, run_sampling

    return {"device_preference": read_settings(folder).device}, lambda info: run_sampling(folder, info)


def _cache(folder: Path, resume: bool) -> tuple[dict[str, Any], Work]:
    from noisevalue.config import RESOLVED_RECIPE, load_recipe
    from noisevalue.train.data import build_cache

    recipe = load_recipe(folder / RESOLVED_RECIPE)  # data.latent_cache: an absolute path
    return init_options(recipe), lambda info: build_cache(recipe, recipe.output_dir, info,
                                                          say=lambda text: print(text, flush=True))


KINDS: dict[str, Callable[[Path, bool], tuple[dict[str, Any], Work]]] = {
    "run": _run, "experiment": _experiment, "sample": _sample, "cache": _cache,
}


def launcher_args(kind: str, folder: str | Path, resume: bool = False, **launch: Any) -> list[str]:
    """The ``torch.distributed.run`` command line that starts job ``kind`` on ``folder`` on
    every rank (``launch``: the launch options, see :func:`noisevalue.distributed.launcher_args`)."""
    from noisevalue import distributed

    if kind not in KINDS:
        raise ValueError(f"unknown job kind '{kind}' (known: {', '.join(KINDS)})")
    return distributed.launcher_args(__name__, [kind, str(folder), *(["--resume"] if resume else [])], **launch)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m noisevalue.jobs")
    parser.add_argument("kind", choices=list(KINDS))
    parser.add_argument("folder", type=Path)
    parser.add_argument("--resume", action="store_true")
    args = parser.parse_args(argv)
    return run_rank(lambda: KINDS[args.kind](args.folder, args.resume))


def run_rank(prepare: Callable[[], tuple[dict[str, Any], Work]]) -> int:
    """One rank: ``prepare()`` gives how to join (:func:`noisevalue.distributed.init`'s
    keyword arguments) and the work; joins the process group, does the work, and always
    leaves the group."""
    from noisevalue import distributed

    info = None
    try:
        options, work = prepare()
        info = distributed.init(**options)
        work(info)
    except UserError as exc:
        if not distributed.report_error(str(exc), exc.exit_code):  # the launcher prints it once
            print(f"noisevalue: error: {exc}", file=sys.stderr)
        return exc.exit_code
    finally:
        if info is not None:
            distributed.cleanup(info)
    return 0


def leave(code: int) -> None:
    """End a worker process now, with ``code``, once its work is done and its process group
    left: output flushed and logs closed, but no interpreter teardown. Tearing down a
    process that held a gloo group can abort in C++ (SIGABRT, "terminate called without an
    active exception") about one run in ten on the CPU, which would fail a finished job."""
    import logging
    import os

    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    leave(main())
