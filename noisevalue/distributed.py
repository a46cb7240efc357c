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
from collections.abc import Iterator
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


#: the process group's timeout when a recipe sets none (``train.dist_timeout``, seconds):
#: longer than any wait the trainers leave between two collectives (a checkpoint written by
#: rank 0, the last uneven shard of an evaluation), shorter than a night
DEFAULT_TIMEOUT_S = 1800.0


def init(device_preference: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S, tf32: bool = True,
         group: bool | None = None) -> DistInfo:
    """Join the process group if launched by torchrun; otherwise a single process.

    ``timeout_s``: how long a collective waits for the slowest rank before the job stops
    (NCCL's watchdog; gloo's wait). ``tf32``: on CUDA, float32 matmuls and convolutions use
    TF32 tensor cores (False: strict float32). ``group``: join a process group even of one
    process (None: when there are several)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_preference, local_rank)
    if device.type == "cuda":
        use_tf32(tf32)
    if (world > 1 if group is None else group) and not torch.distributed.is_initialized():
        from datetime import timedelta

        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        torch.distributed.init_process_group(backend=backend, timeout=timedelta(seconds=float(timeout_s)))
    return DistInfo(rank, local_rank, world, device)


def use_tf32(enabled: bool) -> None:
    """TF32 for float32 matmuls and cuDNN convolutions (CUDA only; no effect on the CPU)."""
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def process_group_timeout() -> float | None:
    """The default process group's timeout in seconds (None without a process group)."""
    if not torch.distributed.is_initialized():
        return None
    from torch.distributed.distributed_c10d import _get_default_group

    group = _get_default_group()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.distributed.get_backend() == "nccl" else torch.device("cpu")
    timeout = getattr(getattr(group._get_backend(device), "options", None), "_timeout", None)
    return timeout.total_seconds() if timeout is not None else None


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


def broadcast_object(obj: Any, info: DistInfo, src: int = 0) -> Any:
    """``obj`` of rank ``src``, on every rank (a small picklable value: a decision, a path)."""
    if not info.distributed:
        return obj
    box = [obj if info.rank == src else None]
    torch.distributed.broadcast_object_list(box, src=src, device=_object_device(info))
    return box[0]


def gather_rows(tensor: torch.Tensor, info: DistInfo) -> torch.Tensor | None:
    """The rows ``[n_r, ...]`` of every rank concatenated in rank order on rank 0 (None on the
    others). Ranks may hold different numbers of rows; the trailing shape and dtype agree."""
    if not info.distributed:
        return tensor
    counts = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(info.world_size)]
    torch.distributed.all_gather(counts, torch.tensor([len(tensor)], device=tensor.device))
    most = int(max(int(c) for c in counts))
    padded = tensor.new_zeros((most, *tensor.shape[1:]))
    padded[: len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in range(info.world_size)] if info.is_main else None
    torch.distributed.gather(padded, parts, dst=0)
    if not info.is_main:
        return None
    assert parts is not None
    return torch.cat([p[: int(c)] for p, c in zip(parts, counts, strict=True)])


def stream_to_main(
    owners: list[int], mine: Iterator[torch.Tensor], info: DistInfo
) -> Iterator[torch.Tensor]:
    """Blocks of work spread over the ranks (block ``b`` made by rank ``owners[b]``, each rank
    producing its own blocks in order through ``mine``), read in block order on rank 0, one
    block in flight at a time: rank 0 iterates over every block, the others send theirs and
    yield nothing. Memory stays at one block per rank whatever the number of blocks."""
    if not info.distributed:
        yield from mine
        return
    if not info.is_main:
        for block in mine:
            header = torch.tensor([block.dim(), *block.shape, *[0] * (8 - block.dim())], dtype=torch.long)
            torch.distributed.send(header.to(info.device), dst=0)
            torch.distributed.send(block.contiguous().float().to(info.device), dst=0)
        return
    for owner in owners:
        if owner == 0:
            yield next(mine)
            continue
        header = torch.empty(9, dtype=torch.long, device=info.device)
        torch.distributed.recv(header, src=owner)
        shape = [int(v) for v in header[1 : 1 + int(header[0])]]
        block = torch.empty(shape, dtype=torch.float32, device=info.device)
        torch.distributed.recv(block, src=owner)
        yield block.cpu()


def _object_device(info: DistInfo) -> torch.device | None:
    return info.device if info.device.type == "cuda" else None


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
