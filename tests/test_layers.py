"""The package's import graph has no cycle, counting imports inside functions too (a lazy
import still ties two modules together)."""

import ast
from pathlib import Path

import noisevalue

PACKAGE = Path(noisevalue.__file__).resolve().parent


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {name: set() for name in files}
    for name, path in files.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from a.b import c` runs a.b (and c, when c is a module)
                targets = [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in files and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_sees_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    graph = import_graph()
    assert "noisevalue.experiments.stages" in graph["noisevalue.experiments.protocol"]  # the graph is read
    assert cycles(graph) == []


# The layers, lowest first: a module may import its own layer and those below it only.
LAYERS = [
    ("core", {"noisevalue", "noisevalue.errors", "noisevalue.interfaces", "noisevalue.registry", "noisevalue.recompute", "noisevalue.attention",
              "noisevalue.config", "noisevalue.checkpoint", "noisevalue.diffusion", "noisevalue.distributed", "noisevalue.files",
              "noisevalue.ema", "noisevalue.faults", "noisevalue.builtin_recipes"}),
    ("components", {"noisevalue.backbones", "noisevalue.raters", "noisevalue.selectors", "noisevalue.meta", "noisevalue.weightings",
                    "noisevalue.data", "noisevalue.evaluators"}),
    ("train", {"noisevalue.train"}),
    ("experiments, sampling", {"noisevalue.experiments", "noisevalue.sampling"}),
    ("entry points", {"noisevalue.jobs", "noisevalue.cli", "noisevalue.cli_options", "noisevalue.cli_sampling"}),
]


def layer_of(module: str) -> int:
    for rank, (_, prefixes) in enumerate(LAYERS):
        if module in prefixes or any(module.startswith(p + ".") for p in prefixes - {"noisevalue"}):
            return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    found = [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a]) if layer_of(b) > layer_of(a)]
    # experiments and sampling share a layer but are independent of each other
    found += [f"{a} -> {b}" for a in sorted(graph) for b in sorted(graph[a])
              if {_package(a), _package(b)} == {"experiments", "sampling"}]
    return found


def test_the_layer_check_sees_an_upward_import():
    graph = {"noisevalue.config": {"noisevalue.train.batches"}, "noisevalue.train.batches": set(),
             "noisevalue.sampling.sample": {"noisevalue.experiments.stages"}, "noisevalue.experiments.stages": set()}
    assert upward_imports(graph) == ["noisevalue.config -> noisevalue.train.batches",
                                     "noisevalue.sampling.sample -> noisevalue.experiments.stages"]


def test_imports_point_down_the_layers():
    graph = import_graph()
    assert {layer_of(m) for m in graph} == set(range(len(LAYERS)))  # every module placed, every layer used
    assert upward_imports(graph) == []
