"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s demo``."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]


@nox.session
def tests(session: nox.Session) -> None:
    plugins = [arg for path in sorted(Path("plugins").iterdir()) if path.is_dir() for arg in ("-e", str(path))]
    session.install(*TORCH, "-e", ".[test]", *plugins)  # every package under plugins/
    session.run("pytest", "-q", *session.posargs)


@nox.session
def lint(session: nox.Session) -> None:
    session.install("ruff")
    session.run("ruff", "check", "noisevalue", "tests", "benchmarks", "plugins", "noxfile.py")


@nox.session
def typecheck(session: nox.Session) -> None:
    session.install(*TORCH, "-e", ".", "mypy")
    session.run("mypy", "noisevalue")


@nox.session
def demo(session: nox.Session) -> None:
    """The embedded default end to end (digits, a few minutes on a laptop CPU)."""
    session.install(*TORCH, "-e", ".")
    session.run("noisevalue", "run", *session.posargs)
