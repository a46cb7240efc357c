"""Registry discovery from entry-point metadata: name clashes between distributions, and
`plugins list` reading metadata only (`--check` imports).

Fake distributions are tiny ``*.dist-info`` folders on ``sys.path``, found by the standard
library exactly as an installed package is.
"""

import os
import subprocess
import sys
import textwrap

import pytest
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app
from noisevalue.errors import ConfigError, PluginError

runner = CliRunner()


def write_dist(site, dist, entry_points):
    """A minimal installed distribution: METADATA and entry_points.txt ({group: {name: target}})."""
    info = site / f"{dist.replace('-', '_')}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    text = ""
    for group, eps in entry_points.items():
        text += f"[{group}]\n" + "".join(f"{name} = {target}\n" for name, target in eps.items()) + "\n"
    (info / "entry_points.txt").write_text(text)


@pytest.fixture
def install(tmp_path, monkeypatch):
    """Install fake distributions (and plain modules) into a fresh folder put first on sys.path."""
    monkeypatch.delenv(registry.AUTOLOAD_ENV, raising=False)
    site = tmp_path / "site"
    site.mkdir()

    def _install(dists, modules=None):
        for dist, eps in dists.items():
            write_dist(site, dist, eps)
        for name, source in (modules or {}).items():
            (site / f"{name}.py").write_text(textwrap.dedent(source))
        monkeypatch.syspath_prepend(str(site))
        registry.reset()
        return site

    registry.reset()
    yield _install
    registry.reset()
    for name in [m for m in sys.modules if m.startswith("nv_test_")]:
        del sys.modules[name]


def by_name(kind):
    return {e.name: e for e in registry.entries(kind)}


OK_MODULE = """
    class Component:
        def __init__(self, size: int = 1):
            self.size = size
"""


def test_clash_with_a_builtin_is_kept_listed_and_refused(install):
    install(
        {"shadow-plugin": {"noisevalue.selectors": {"random": "nv_test_shadow:Sel", "own": "nv_test_ok:Component"}}},
        {"nv_test_ok": OK_MODULE},
    )
    random = by_name("selector")["random"]
    # The plugin is found first on sys.path; the built-in is still listed first.
    assert (random.distribution, random.target) == ("noisevalue", "noisevalue.selectors.builtin:RandomSelector")
    assert [(e.distribution, e.target) for e in random.clashes] == [("shadow-plugin", "nv_test_shadow:Sel")]

    for use in (
        lambda: registry.get("selector", "random"),
        lambda: registry.create("selector", "random", k=2),
        lambda: registry.check_params("selector", "random", {"k": 2}),
    ):
        with pytest.raises(PluginError) as info:
            use()
        message = str(info.value)
        assert "\n" not in message
        assert "selector 'random'" in message
        assert "'noisevalue'" in message and "'shadow-plugin'" in message
        assert "uninstall" in message and f"{registry.AUTOLOAD_ENV}=1" in message
    assert "nv_test_shadow" not in sys.modules

    # A name without a clash behaves as before.
    assert registry.create("selector", "own", size=3).size == 3
    with pytest.raises(PluginError, match="unknown selector 'nope'"):
        registry.get("selector", "nope")


def test_clash_between_two_plugins_names_both(install):
    install({
        "plugin-a": {"noisevalue.raters": {"twin": "nv_test_a:Rater"}},
        "plugin-b": {"noisevalue.raters": {"twin": "nv_test_b:Rater"}},
    })
    twin = by_name("rater")["twin"]
    assert sorted(e.distribution for e in twin.providers) == ["plugin-a", "plugin-b"]
    with pytest.raises(PluginError, match=r"rater 'twin' is provided by more than one distribution") as info:
        registry.get("rater", "twin")
    assert "'plugin-a' (nv_test_a:Rater)" in str(info.value)
    assert "'plugin-b' (nv_test_b:Rater)" in str(info.value)

    result = runner.invoke(app, ["plugins", "list", "--kind", "rater"])
    assert result.exit_code == 0, result.output
    line = next(x for x in result.stdout.splitlines() if x.split()[0] == "twin")
    other = twin.clashes[0]
    assert line.split()[1] == twin.distribution
    assert f"[CLASH: also provided by distribution '{other.distribution}' ({other.target})]" in line
    assert "CLASH" not in next(x for x in result.stdout.splitlines() if x.split()[0] == "norm")


def test_builtins_only_has_no_clash(install, monkeypatch):
    install({"shadow-plugin": {"noisevalue.selectors": {"random": "nv_test_shadow:Sel"}}})
    monkeypatch.setenv(registry.AUTOLOAD_ENV, "1")
    registry.reset()
    random = by_name("selector")["random"]
    assert random.distribution == "noisevalue" and random.clashes == []


def test_runtime_registration_replaces_a_clashing_name(install):
    install({"shadow-plugin": {"noisevalue.selectors": {"random": "nv_test_shadow:Sel"}}})

    @registry.register("selector", "random")
    class Mine:
        pass

    assert registry.get("selector", "random") is Mine


def test_list_reads_metadata_only_and_check_imports(install):
    install(
        {"boom-plugin": {"noisevalue.evaluators": {"boom": "nv_test_boom:Evaluator", "fine": "nv_test_ok:Component"}}},
        {"nv_test_boom": "raise RuntimeError('imported nv_test_boom')\n", "nv_test_ok": OK_MODULE},
    )
    listed = runner.invoke(app, ["plugins", "list", "--kind", "evaluator"])
    assert listed.exit_code == 0, listed.output
    lines = {x.split()[0]: x for x in listed.stdout.splitlines() if x.startswith("  ")}
    assert lines["boom"].split()[1:] == ["boom-plugin", "nv_test_boom:Evaluator"]
    assert lines["fine"].split()[1:] == ["boom-plugin", "nv_test_ok:Component"]
    assert "FAILED" not in listed.output
    assert "nv_test_boom" not in sys.modules and "nv_test_ok" not in sys.modules

    checked = runner.invoke(app, ["plugins", "list", "--kind", "evaluator", "--check"])
    assert checked.exit_code == 2
    lines = {x.split()[0]: x for x in checked.stdout.splitlines() if x.startswith("  ")}
    assert "[FAILED: evaluator 'boom' from distribution 'boom-plugin'" in lines["boom"]
    assert "RuntimeError: imported nv_test_boom" in lines["boom"]
    assert "FAILED" not in lines["fine"] and "FAILED" not in lines["fid"]
    assert "nv_test_ok" in sys.modules
    assert checked.stderr.strip().splitlines() == ["noisevalue: error: plugins check: 1 failed to load"]


def test_check_fails_on_a_clash(install):
    install({"shadow-plugin": {"noisevalue.datasets": {"digits": "nv_test_ok:Component"}}}, {"nv_test_ok": OK_MODULE})
    checked = runner.invoke(app, ["plugins", "list", "--kind", "dataset", "--check"])
    assert checked.exit_code == 2
    line = next(x for x in checked.stdout.splitlines() if x.split()[0] == "digits")
    assert "[CLASH: also provided by distribution 'shadow-plugin' (nv_test_ok:Component)]" in line
    assert "FAILED" not in line
    assert "1 name clash" in checked.stderr


def test_plugins_list_imports_no_component():
    """In a fresh process, listing every component imports none of them (nor torch)."""
    code = textwrap.dedent("""
        import sys
        from typer.testing import CliRunner
        from noisevalue.cli import app
        result = CliRunner().invoke(app, ["plugins", "list"])
        assert result.exit_code == 0, result.output
        assert "DiT-S/2" in result.stdout and "FAILED" not in result.output
        components = ("noisevalue.backbones", "noisevalue.raters", "noisevalue.selectors", "noisevalue.meta",
                      "noisevalue.evaluators", "noisevalue.data")
        print(sorted(m for m in sys.modules if m.split(".")[0] == "torch" or m.startswith(components)))
    """)
    env = dict(os.environ)
    env.pop(registry.AUTOLOAD_ENV, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------ build: the one way in
class _Widget:
    """A component with shape keywords and a checked value."""

    def __init__(self, input_size: int = 4, in_channels: int = 3, num_classes: int = 0, width: int = 8):
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        self.shape = (input_size, in_channels, num_classes, width)


@pytest.fixture
def widget():
    registry.register("rater", "test-widget")(_Widget)
    yield
    registry.reset()


def test_with_shapes_fills_the_shape_keywords_from_the_data(widget):
    params = registry.with_shapes("rater", registry.Named("test-widget", {"width": 2}), "rater", (1, 8, 8), 10)
    built = registry.build("rater", registry.Named("test-widget", params), where="rater")
    assert built.shape == (8, 1, 10, 2)
    with pytest.raises(ConfigError) as err:  # a recipe value that disagrees with the data
        registry.with_shapes("rater", registry.Named("test-widget", {"in_channels": 4}), "rater", (1, 8, 8), 10)
    assert str(err.value) == "rater.params.in_channels: 4 does not match the data, which gives 1"


def test_build_turns_a_bad_value_into_one_line_naming_the_recipe_path(widget):
    with pytest.raises(ConfigError) as err:
        registry.build("rater", registry.Named("test-widget", {"width": 0}), where="rater")
    assert str(err.value) == "rater (test-widget): width must be >= 1, got 0"
    with pytest.raises(ConfigError, match=r"^rater.params: unknown parameter 'depth' for rater 'test-widget'"):
        registry.build("rater", registry.Named("test-widget", {"depth": 2}), where="rater")
    with pytest.raises(PluginError, match=r"^rater.name: unknown rater 'no-such'"):
        registry.build("rater", registry.Named("no-such"), where="rater")
    # in code (registry.create), the constructor's own exception passes through unchanged
    with pytest.raises(ValueError, match="width must be >= 1"):
        registry.create("rater", "test-widget", width=0)
