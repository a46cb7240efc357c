"""Developer sessions: ``nox -s tests``, ``nox -s lint``, ``nox -s typecheck``, ``nox -s demo``,
``nox -s oldest_torch`` (the tests on the oldest torch that pyproject.toml allows; run it before a release and
whenever a newer torch API is used: it installs torch 2.6.0 with its CUDA libraries, some 3 GB,
too slow a download for CI)."""

from pathlib import Path

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
TORCH = ["torch==2.14.1", "torchvision==0.29.1"]
# the floor of pyproject.toml's torch>=2.6 (torch.nn.utils.get_total_norm arrived in 2.6)
OLDEST_TORCH = ["torch==2.6.0", "torchvision==0.21.0"]


def plugin_args() -> list[str]:
    return [arg for path in sorted(Path("plugins").iterdir()) if path.is_dir() for arg in ("-e", str(path))]


@nox.session
def tests(session: nox.Session) -> None:
    session.install(*TORCH, "-e", ".[test]", *plugin_args())  # every package under plugins/
    session.run("pytest", "-q", *session.posargs)


@nox.session
def oldest_torch(session: nox.Session) -> None:
    """The test suite on the oldest torch pyproject.toml allows. The rehearsal
    (tests/test_rehearsal.py: the paper recipe under several processes, 9 minutes) runs in
    the main session only; every other test, multi-process ones included, runs here."""
    # setuptools >= 77 for the plugin packages the plugin tests build without isolation
    session.install(*OLDEST_TORCH, "setuptools>=77", "-e", ".[test]", *plugin_args())
    session.run("python", "-c", "import torch; assert torch.__version__.startswith('2.6.'), torch.__version__")
    session.run("pytest", "-q", "--deselect", "tests/test_rehearsal.py", *session.posargs)


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
