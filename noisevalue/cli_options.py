"""What several ``noisevalue`` commands share: where processes are started
(torch.distributed.run's launch settings) and how a user's mistake is reported."""

from __future__ import annotations

import contextlib
import importlib
import sys
from collections.abc import Iterator
from typing import Any

import typer
from typer.core import TyperGroup


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """An exception class of click, and of the copy of click that newer typer versions carry."""
    found = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError, AttributeError):
            found.append(getattr(importlib.import_module(module), name))
    return tuple(found)


_USAGE_ERRORS = _click_classes("ClickException")
_ABORTS: tuple[type[BaseException], ...] = (*_click_classes("Abort"), typer.Abort)

NprocOpt = typer.Option(1, "--nproc-per-node", min=1, help="Processes (GPUs) per machine.")
NnodesOpt = typer.Option("1", "--nnodes", help="Number of machines (or MIN:MAX).")
NodeRankOpt = typer.Option(0, "--node-rank", help="This machine's rank (with --rdzv-endpoint).")
RdzvOpt = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT for several machines.")
RdzvIdOpt = typer.Option("noisevalue", "--rdzv-id", help="Rendezvous id shared by all machines.")


class OneLineErrors(TyperGroup):
    """The command group whose usage errors (a bad option value, an unknown option, a missing
    argument) are one line on stderr with exit code 2, like every other user error, instead
    of a boxed panel. Help and the commands' own exit codes are unchanged."""

    def main(self, *args: Any, standalone_mode: bool = True, **extra: Any) -> Any:  # type: ignore[override]
        try:
            rv = super().main(*args, standalone_mode=False, **extra)  # type: ignore[misc]
        except _USAGE_ERRORS as exc:
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as before
                exc.show()  # type: ignore[attr-defined]
                rv = 0
            else:
                ctx = getattr(exc, "ctx", None)
                where = f"{ctx.command_path}: " if ctx is not None else ""
                hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                message = " ".join(exc.format_message().split())  # type: ignore[attr-defined]
                typer.echo(f"noisevalue: error: {where}{message}{hint}", err=True)
                rv = exc.exit_code  # type: ignore[attr-defined]
        except _ABORTS:
            rv = 1
        if not standalone_mode:
            return rv
        sys.exit(rv if isinstance(rv, int) else 0)


def launch_settings(
    nproc_per_node: int, nnodes: str, node_rank: int, rdzv_endpoint: str | None, rdzv_id: str
) -> dict[str, Any]:
    """The launch options as keyword arguments of ``distributed.launcher_args`` (``nnodes``:
    a count or MIN:MAX)."""
    from noisevalue.errors import ConfigError

    parts = str(nnodes).split(":")
    if not (1 <= len(parts) <= 2 and all(p.isdigit() and int(p) >= 1 for p in parts)) or int(parts[0]) > int(parts[-1]):
        raise ConfigError(f"--nnodes {nnodes!r}: expected a number of machines (>= 1) or MIN:MAX")
    if node_rank < 0 or node_rank >= int(parts[-1]):
        raise ConfigError(f"--node-rank {node_rank}: expected 0 .. {int(parts[-1]) - 1} for --nnodes {nnodes}")
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
