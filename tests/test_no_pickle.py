"""No code runs from a user-named weights file: the FID Inception weights are read with
weights_only=True and torch-fidelity only ever sees our own tensor-only copy."""


import pytest
import torch
from typer.testing import CliRunner

from noisevalue.cli import app
from noisevalue.errors import WeightsUnavailableError
from noisevalue.evaluators.fid import FIDEvaluator
from tests.conftest import CodeRunsIfUnpickled


def crafted(tmp_path):
    marker = tmp_path / "CODE_RAN"
    path = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    torch.save({"fc.weight": torch.zeros(2), "trap": CodeRunsIfUnpickled(str(marker))}, path)
    return path, marker


def test_a_crafted_weights_file_runs_nothing_and_is_one_line(tmp_path):
    path, marker = crafted(tmp_path)
    with pytest.raises(WeightsUnavailableError) as err:
        FIDEvaluator(features="inception", weights_path=path)
    assert not marker.exists()
    message = str(err.value)
    assert "is not a plain tensor file, refused" in message and "\n" not in message
    # the CLI: noisevalue eval --weights, one line, exit code 2, still nothing ran
    samples = tmp_path / "s.npz"
    import numpy as np

    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), dtype=np.uint8))
    result = CliRunner().invoke(app, ["eval", str(samples), "--reference", "digits", "--metric", "fid",
                                      "--weights", str(path)])
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert "refused" in result.stderr and not marker.exists()


def test_a_plain_tensor_file_passes_the_check(tmp_path):
    path = tmp_path / "plain.pth"
    torch.save({"fc.weight": torch.zeros(2)}, path)
    with pytest.raises(WeightsUnavailableError) as err:  # wrong keys: torch-fidelity refuses it, safely
        FIDEvaluator(features="inception", weights_path=path)
    assert "refused" not in str(err.value)
