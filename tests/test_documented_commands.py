"""Every command the documentation and the recipe headers quote is a valid recipe: its
overrides (list items by index included) apply, and its process count fits the batches.
Files the commands name (ImageNet, the VAE, the Inception weights) are not on this machine,
so the recipe is checked without them (``recipe validate --no-files``)."""

import re
import shlex
from pathlib import Path

import pytest
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.config import load_recipe
from noisevalue.errors import ConfigError
from noisevalue.train.meta_training import subproblems
from noisevalue.train.preflight import check_batches

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*ROOT.glob("docs/*.md"), ROOT / "README.md", *ROOT.glob("noisevalue/builtin_recipes/*.yaml")])
RECIPE_COMMANDS = ("run", "ablate", "transfer", "analyze", "compare", "cache", "ladder")
VALUED = {"--method", "--remove", "--to", "--rater", "--checkpoint", "--checkpoints", "--step", "--steps",
          "--nproc-per-node", "--nnodes", "--node-rank", "--rdzv-endpoint", "--rdzv-id", "--allow-changes", "--budget"}
FLAGS = {"--noise-only", "--signal", "--resume", "--files", "--no-files"}


def quoted_commands(path: Path) -> list[str]:
    """The ``noisevalue`` command lines a file quotes: in code blocks, in inline code and in
    a recipe's header comments, line continuations joined and shell variables expanded."""
    text = path.read_text()
    if path.suffix == ".yaml":
        text = "\n".join(line[1:].strip() for line in text.splitlines() if line.startswith("#"))
    text = re.sub(r"\\\n\s*", " ", text)
    variables = dict(re.findall(r'^(\w+)="([^"]*)"', text, re.M))
    found = []
    for line in text.splitlines():
        spans = re.findall(r"`(noisevalue [^`]+)`", line) or ([line[line.index("noisevalue "):]]
                                                              if re.search(r"(^|\s)noisevalue (\w)", line) else [])
        for span in spans:
            for name, value in variables.items():
                span = span.replace(f"${name}", value)
            found.append(span)
    return found


def recipe_words(command: str) -> tuple[list[str], int] | None:
    """(recipe and overrides, processes) of a recipe-running command; None for other
    commands and for placeholders (``RECIPE``, ``...``, a file of the reader's own)."""
    command = re.split(r"\s+(#|&|>|\|)", command)[0]
    try:
        words = shlex.split(command)
    except ValueError:
        return None
    if len(words) < 2 or words[0] != "noisevalue":
        return None
    rest = words[2:]
    if words[1] == "recipe" and len(words) > 2 and words[2] in ("show", "validate"):
        rest = words[3:]
    elif words[1] not in RECIPE_COMMANDS:
        return None
    kept, processes, nodes, skip = [], 1, 1, False
    for i, word in enumerate(rest):
        if skip:
            skip = False
            continue
        if word in VALUED:
            skip = True
            value = rest[i + 1] if i + 1 < len(rest) else ""
            if word == "--nproc-per-node":
                processes = int(value)
            if word == "--nnodes":
                nodes = int(value.split(":")[-1])
            continue
        if word.startswith("--") and "=" in word and word.split("=")[0] in VALUED:
            continue
        if word in FLAGS:
            continue
        if word in ("...", "[RECIPE]", "RECIPE", "[key=value", "...]") or word.isupper() or "$" in word:
            return None
        kept.append(word)
    if kept and "=" not in kept[0] and not kept[0].startswith("~"):
        recipe = kept[0]
        if recipe.endswith((".yaml", ".yml")) and not (ROOT / recipe).is_file():
            return None  # the reader's own recipe file
    return kept, processes * nodes


COMMANDS = sorted({(path.relative_to(ROOT).as_posix(), command)
                   for path in SOURCES for command in quoted_commands(path) if recipe_words(command)})


def test_the_documentation_quotes_the_paper_commands():
    quoted = " ".join(command for _, command in COMMANDS)
    assert len(COMMANDS) >= 30
    assert "eval.evaluators.0.params.weights_path=" in quoted  # a list item by its index
    assert "--nproc-per-node 8" in quoted and "--nnodes 2" in quoted


@pytest.mark.parametrize("source, command", COMMANDS, ids=[f"{s}: {c[:60]}" for s, c in COMMANDS])
def test_a_documented_command_is_a_valid_recipe(source, command):
    words, processes = recipe_words(command)
    result = CliRunner().invoke(app, ["recipe", "validate", "--no-files", *words])
    assert result.exit_code == 0, (source, command, result.stderr)
    recipe_args = words if words and "=" not in words[0] and not words[0].startswith("~") else ["digits", *words]
    check_batches(load_recipe(recipe_args[0], recipe_args[1:]), processes)


def test_the_paper_recipes_give_the_same_rater_on_1_to_16_processes():
    recipe = load_recipe("imagenet_cond")
    assert recipe.meta.subproblems == 16
    for processes in (1, 2, 4, 8, 16):
        assert subproblems(recipe, processes) == 16
        check_batches(recipe, processes)
    batch_96 = {"train": recipe.train.model_copy(update={"global_batch_size": 96})}
    with pytest.raises(ConfigError, match="meta.subproblems: 16 is not divisible by the 3 processes"):
        check_batches(recipe.model_copy(update=batch_96), 3)
    unset = load_recipe("imagenet_cond", ["meta.subproblems=null"])  # one inner loop per process
    for processes in (1, 4, 8, 16):
        assert subproblems(unset, processes) == processes
    with pytest.raises(ConfigError, match="meta.groups: 32 is not divisible by meta.subproblems"):
        check_batches(unset.model_copy(update=batch_96), 3)
    pinned = load_recipe("imagenet_cond", ["meta.subproblems=4"])
    with pytest.raises(ConfigError, match="meta.subproblems: 4 is not divisible by the 8 processes"):
        check_batches(pinned, 8)
