"""Process-group setup and the in-process ``torch.distributed.run`` launcher.

``noisevalue run RECIPE --nproc-per-node N`` calls ``torch.distributed.run`` from inside
the CLI process (standalone rendezvous on one machine, a c10d endpoint on several), which
starts N workers running :mod:`noisevalue.jobs`. Each worker joins the process
group (NCCL on GPUs, gloo on CPU) and binds to ``cuda:LOCAL_RANK``: the *local* rank, not
the global one, so a second node uses its own GPUs 0..N-1.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def pick_device(preference: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """``cuda:local_rank`` for ``cuda`` (or ``auto`` where CUDA is available), else the CPU;
    ``cuda`` without CUDA is a ConfigError naming ``what``."""
    if preference == "cuda" or (preference == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            from noisevalue.errors import ConfigError

            raise ConfigError(f"{what}: 'cuda' requested but CUDA is not available on this machine (use auto or cpu)")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_preference: str = "auto") -> DistInfo:
    """Join the process group if launched by torchrun; otherwise a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if world > 1 and not torch.distributed.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend)
    return DistInfo(rank, local_rank, world, device)


def barrier(info: DistInfo) -> None:
    if info.distributed:
        torch.distributed.barrier()


def cleanup(info: DistInfo) -> None:
    if info.distributed and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def all_reduce_sum(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
    return tensor


def all_reduce_mean(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.distributed:
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM)
        tensor /= info.world_size
    return tensor


def launcher_args(
    module: str,
    worker_args: list[str],
    nproc_per_node: int,
    nnodes: str = "1",
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str = "noisevalue",
) -> list[str]:
    """The ``torch.distributed.run`` command line that runs ``python -m module *worker_args``
    on every process."""
    args = [f"--nproc-per-node={nproc_per_node}", f"--nnodes={nnodes}"]
    if rdzv_endpoint:
        args += [
            "--rdzv-backend=c10d",
            f"--rdzv-endpoint={rdzv_endpoint}",
            f"--rdzv-id={rdzv_id}",
            f"--node-rank={node_rank}",
        ]
    else:
        args += ["--standalone"]
    return args + ["-m", module, *worker_args]


#: set by :func:`launch` for its workers: the folder where a worker leaves its one-line error
ERRORS_ENV = "NOISEVALUE_ERRORS_DIR"


def report_error(message: str, exit_code: int) -> bool:
    """In a worker started by :func:`launch`: leave this rank's one-line error for the
    launcher to print once. False outside such a worker (print it yourself)."""
    folder = os.environ.get(ERRORS_ENV)
    if not folder or not os.path.isdir(folder):
        return False
    rank = int(os.environ.get("RANK", "0"))
    with open(os.path.join(folder, f"rank{rank:05d}.txt"), "w") as fh:
        fh.write(f"{exit_code}\n{message}")
    return True


def launch(args: list[str]) -> None:
    """Run ``torch.distributed.run`` in-process with ``args``. When workers stop
    on a user error, raises :class:`~noisevalue.errors.WorkerError` with the lowest rank's
    one line (once, however many ranks hit it); other failures keep the workers' tracebacks
    and raise one with their exit codes."""
    import shutil
    import tempfile

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    from noisevalue.errors import WorkerError

    parsed: Any = get_args_parser().parse_args(args)
    folder = tempfile.mkdtemp(prefix="noisevalue-errors-")
    previous = os.environ.get(ERRORS_ENV)
    os.environ[ERRORS_ENV] = folder
    # the launcher's own log lines (a failed worker's exit code, thread settings) would
    # bury the one line that says what went wrong; workers keep their own stderr
    quiet = [logging.getLogger(name) for name in ("torch.distributed.elastic", "torch.distributed.run")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL)
    try:
        run(parsed)
    except ChildFailedError as exc:
        reports = sorted(os.listdir(folder))
        if reports:
            with open(os.path.join(folder, reports[0])) as fh:
                code, _, message = fh.read().partition("\n")
            raise WorkerError(message, int(code)) from None
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        raise WorkerError(f"distributed run failed: worker exit codes {codes} (tracebacks above)", 1) from None
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)
        if previous is None:
            os.environ.pop(ERRORS_ENV, None)
        else:
            os.environ[ERRORS_ENV] = previous
        shutil.rmtree(folder, ignore_errors=True)
