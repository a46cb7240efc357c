import torch

from noisevalue import registry


def test_discovered_and_built_through_the_registry():
    assert "example-mlp" in registry.names("backbone")
    model = registry.create("backbone", "example-mlp", input_size=8, in_channels=1, num_classes=10)
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([1, 2, 3]), torch.tensor([0, 1, 10]))
    assert out.shape == x.shape
