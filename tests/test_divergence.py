"""The divergence guard of diffusion training: stop (naming the last good checkpoint) or skip,
never a non-finite checkpoint; sampling refuses non-finite weights."""

import json

import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from noisevalue.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def all_finite(folder):
    for ckpt in sorted(folder.glob("checkpoints/step_*")):
        for f in ckpt.glob("*.safetensors"):
            for name, v in load_file(str(f)).items():
                if v.is_floating_point() and not torch.isfinite(v).all():
                    return f"{f.name}:{name}"
    return None


def test_a_diverging_run_stops_at_the_first_nonfinite_step(tiny_overrides, tmp_path):
    result = invoke("run", *tiny_overrides, "train.steps=6", "train.lr=1e6")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "training diverged: non-finite loss or gradient at step" in err
    run = tmp_path / "run"
    last = sorted(run.glob("checkpoints/step_*"))[-1]
    assert f"are in '{last}'" in err and all_finite(run) is None


def test_skip_steps_over_a_bounded_number_then_stops(tiny_overrides, tmp_path):
    result = invoke("run", *tiny_overrides, "train.steps=6", "train.lr=1e6", "train.nonfinite=skip", "train.max_skips=2")
    assert result.exit_code == 2 and "after skipping 2 step(s)" in result.stderr
    run = tmp_path / "run"
    assert all_finite(run) is None
    logged = [json.loads(line) for line in (run / "scalars.jsonl").read_text().splitlines()]
    assert any(row.get("train/skipped_steps") == 2.0 for row in logged)
    last = sorted(run.glob("checkpoints/step_*"))[-1]  # a resume continues the count
    assert json.loads((last / "meta.json").read_text())["skipped"] == 2


def test_sampling_refuses_nonfinite_weights(tiny_overrides, tmp_path):
    assert invoke("run", *tiny_overrides).exit_code == 0
    ckpt = sorted((tmp_path / "run").glob("checkpoints/step_*"))[-1]
    ema = load_file(str(ckpt / "ema.safetensors"))
    key = next(iter(ema))
    ema[key] = torch.full_like(ema[key], float("nan"))
    save_file(ema, str(ckpt / "ema.safetensors"))
    result = invoke("sample", tmp_path / "run", "--num", 2, "--out", tmp_path / "s")
    assert result.exit_code == 2 and result.stderr.strip().count("\n") == 0
    assert f"ema.safetensors holds non-finite values ('{key}')" in result.stderr


def test_a_diverging_run_is_stopped_at_its_next_logging_step(tiny_overrides, tmp_path):
    """Steps between logging steps do not wait for the device: a non-finite step is skipped
    where it happens and the run stops at the next logging step, its weights finite."""
    result = invoke("run", *tiny_overrides, "train.steps=6", "train.lr=1e6", "train.log_every=3", "train.ckpt_every=6")
    assert result.exit_code == 2
    err = result.stderr.strip()
    assert err.count("\n") == 0 and "; stopped at step 3." in err, err
    run = tmp_path / "run"
    last = sorted(run.glob("checkpoints/step_*"))[-1]
    assert last.name == "step_0000003" and f"are in '{last}'" in err and all_finite(run) is None
