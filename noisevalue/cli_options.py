"""What several ``noisevalue`` commands share: where processes are started
(torch.distributed.run's launch settings) and how a user's mistake is reported."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import typer

NprocOpt = typer.Option(1, "--nproc-per-node", min=1, help="Processes (GPUs) per machine.")
NnodesOpt = typer.Option("1", "--nnodes", help="Number of machines (or MIN:MAX).")
NodeRankOpt = typer.Option(0, "--node-rank", help="This machine's rank (with --rdzv-endpoint).")
RdzvOpt = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT for several machines.")
RdzvIdOpt = typer.Option("noisevalue", "--rdzv-id", help="Rendezvous id shared by all machines.")


def launch_settings(
    nproc_per_node: int, nnodes: str, node_rank: int, rdzv_endpoint: str | None, rdzv_id: str
) -> dict[str, Any]:
    """The launch options as keyword arguments of ``distributed.launcher_args``."""
    return {"nproc_per_node": nproc_per_node, "nnodes": nnodes, "node_rank": node_rank,
            "rdzv_endpoint": rdzv_endpoint, "rdzv_id": rdzv_id}


def single_process(launch: dict[str, Any]) -> bool:
    """True when the launch settings describe one process on this machine (run in-process)."""
    return launch["nproc_per_node"] == 1 and str(launch["nnodes"]) == "1" and launch["rdzv_endpoint"] is None


def world_size(launch: dict[str, Any]) -> int:
    """Processes in all: per machine times machines (the upper bound of MIN:MAX)."""
    return int(launch["nproc_per_node"]) * int(str(launch["nnodes"]).split(":")[-1])


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A user's mistake is one line on stderr and exit code 2; bugs keep their traceback."""
    from noisevalue.errors import UserError

    try:
        yield
    except UserError as exc:
        typer.echo(f"noisevalue: error: {exc}", err=True)
        raise typer.Exit(exc.exit_code) from None
