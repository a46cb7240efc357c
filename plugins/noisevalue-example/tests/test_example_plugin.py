import torch
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app

runner = CliRunner()


def test_discovered_and_built_through_the_registry():
    assert "example-mlp" in registry.names("backbone")
    model = registry.create("backbone", "example-mlp", input_size=8, in_channels=1, num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 10]))
    assert out.shape == x.shape


def test_the_readme_commands_validate():
    """Every `noisevalue run` command of this package's README is a valid recipe."""
    import shlex
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text().replace("\\\n", " ")
    commands = [shlex.split(line.strip()) for line in text.splitlines() if line.strip().startswith("noisevalue run")]
    assert commands
    for words in commands:
        result = runner.invoke(app, ["recipe", "validate", *words[2:]])
        assert result.exit_code == 0, (words, result.output)
