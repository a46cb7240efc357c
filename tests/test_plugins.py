"""Entry-point discovery: a plugin package installed in a temporary environment."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from noisevalue import registry
from noisevalue.errors import PluginError

ROOT = Path(__file__).resolve().parents[1]


def test_builtins_are_registered_through_entry_points():
    entries = {(e.kind, e.name): e for e in registry.entries()}
    assert entries[("backbone", "DiT-S/2")].distribution == "noisevalue"
    assert entries[("evaluator", "fid")].target == "noisevalue.evaluators.fid:FIDEvaluator"
    with pytest.raises(PluginError, match="unknown selector 'nope'"):
        registry.get("selector", "nope")
    with pytest.raises(PluginError, match="unknown component kind"):
        registry.names("widget")


def test_runtime_registration():
    @registry.register("evaluator", "constant-test")
    class Constant:
        def __init__(self, value: float = 1.0):
            self.value = value

    try:
        assert registry.create("evaluator", "constant-test", value=3.0).value == 3.0
        assert "constant-test" in registry.names("evaluator")
    finally:
        registry.reset()


@pytest.fixture(scope="module")
def plugin_env(tmp_path_factory):
    """The example plugin and a deliberately broken one, pip-installed into a target dir."""
    target = tmp_path_factory.mktemp("site")
    broken = tmp_path_factory.mktemp("broken")
    (broken / "pyproject.toml").write_text(textwrap.dedent("""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "broken-plugin"
        version = "0.0.1"
        [project.entry-points."noisevalue.backbones"]
        broken = "broken_plugin_missing_module:Nope"
        [tool.setuptools]
        py-modules = []
    """))
    for pkg in (ROOT / "plugins" / "noisevalue-example", broken):
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
             "--target", str(target), str(pkg)],
            check=True, capture_output=True,
        )
    env = dict(os.environ, PYTHONPATH=str(target))
    env.pop("NOISEVALUE_DISABLE_PLUGIN_AUTOLOAD", None)
    return env


def run_py(code, env):
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


def test_installed_plugin_is_discovered_and_usable(plugin_env):
    out = run_py("""
        import torch
        from noisevalue import registry
        m = registry.create("backbone", "example-mlp", input_size=8, in_channels=1, num_classes=10, hidden=32)
        print(tuple(m(torch.zeros(2, 1, 8, 8), torch.tensor([1, 2]), torch.tensor([0, 10])).shape))
        e = {x.name: x.distribution for x in registry.entries("backbone")}
        print(e["example-mlp"], e["DiT-S/2"])
    """, plugin_env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["(2, 1, 8, 8)", "noisevalue-example noisevalue"]


def test_broken_plugin_is_reported_and_does_not_break_others(plugin_env):
    out = run_py("""
        from noisevalue import registry
        from noisevalue.errors import PluginError
        try:
            registry.get("backbone", "broken")
        except PluginError as exc:
            print("ERR", exc)
        print(registry.get("backbone", "example-mlp").__name__)
    """, plugin_env)
    assert out.returncode == 0, out.stderr
    first, second = out.stdout.strip().split("\n")
    assert first.startswith("ERR backbone 'broken' from distribution 'broken-plugin'")
    assert "ModuleNotFoundError" in first
    assert second == "MLPDenoiser"

    command = [sys.executable, "-m", "noisevalue.cli", "plugins", "list", "--kind", "backbone"]
    listing = subprocess.run(command, env=plugin_env, capture_output=True, text=True)
    assert listing.returncode == 0  # metadata only: the broken import is not attempted
    lines = {line.split()[0]: line for line in listing.stdout.splitlines() if line.startswith("  ")}
    assert "noisevalue-example" in lines["example-mlp"]
    assert "broken-plugin" in lines["broken"] and "FAILED" not in listing.stdout

    checked = subprocess.run([*command, "--check"], env=plugin_env, capture_output=True, text=True)
    assert checked.returncode == 2
    lines = {line.split()[0]: line for line in checked.stdout.splitlines() if line.startswith("  ")}
    assert "FAILED" in lines["broken"] and "broken-plugin" in lines["broken"]
    assert "FAILED" not in lines["DiT-S/2"] and "FAILED" not in lines["example-mlp"]


def test_autoload_can_be_disabled(plugin_env):
    env = dict(plugin_env, NOISEVALUE_DISABLE_PLUGIN_AUTOLOAD="1")
    out = run_py("from noisevalue import registry; print(registry.names('backbone'))", env)
    assert "example-mlp" not in out.stdout and "broken" not in out.stdout
    assert "DiT-S/2" in out.stdout


def test_cli_help_does_not_import_torch():
    """`noisevalue --help` must answer at once: heavy imports happen inside commands."""
    code = "import sys, noisevalue.cli; print(sorted(m for m in ('torch', 'diffusers', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    help_out = subprocess.run([sys.executable, "-m", "noisevalue.cli", "--help"], capture_output=True, text=True)
    assert help_out.returncode == 0 and "run" in help_out.stdout and "plugins" in help_out.stdout


PLUGIN_READMES = sorted((Path(__file__).resolve().parents[1] / "plugins").glob("*/README.md"))


@pytest.mark.parametrize("readme", PLUGIN_READMES, ids=lambda p: p.parent.name)
def test_the_example_plugins_readme_commands_validate(readme):
    """Every `noisevalue run` command of an example plugin's README is a valid recipe (the
    plugins are installed by the test command)."""
    import shlex

    from typer.testing import CliRunner

    from noisevalue.cli import app

    text = readme.read_text().replace("\\\n", " ")
    commands = [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("noisevalue run")]
    assert commands, readme
    for words in commands:
        result = CliRunner().invoke(app, ["recipe", "validate", *words[2:]])
        assert result.exit_code == 0, (words, result.output)


def test_every_plugin_package_is_installed_so_its_tests_run():
    """The test command installs every package under plugins/ (a new one needs no edit)."""
    import re
    from importlib.metadata import PackageNotFoundError, distribution
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent / "plugins"
    names = [re.search(r'^name = "([^"]+)"', (p / "pyproject.toml").read_text(), re.M).group(1)
             for p in sorted(root.iterdir()) if (p / "pyproject.toml").is_file()]
    assert "noisevalue-immiscible" in names
    missing = []
    for name in names:
        try:
            distribution(name)
        except PackageNotFoundError:
            missing.append(name)
    assert missing == []
