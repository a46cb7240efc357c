"""The three-stage protocol and rater meta-training, end to end at a tiny size."""

import csv
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from noisevalue import registry
from noisevalue.cli import app
from noisevalue.interfaces import MetaGradient, MetaOptimizer

runner = CliRunner()

META = [
    "rater={name: dual_stream_tiny, params: {hidden_size: 32, depth: 1, num_heads: 2}}",
    "meta.inner_steps=2", "meta.groups=4", "meta.group_size=3", "meta.val_batch_size=8",
    "meta.inner_optimizer=sgd", "meta.inner_lr=0.01", "meta.rater_lr=1e-3",
    "meta.log_every=1", "meta.ckpt_every=2",
]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def rater_tensors(run, step):
    return load_file(str(run / "checkpoints" / f"step_{step:07d}" / "rater.safetensors"))


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    from tests.conftest import TINY

    out = tmp_path_factory.mktemp("pre") / "run"
    result = invoke("run", *TINY, f"output_dir={out}")
    assert result.exit_code == 0, result.output
    return out


def meta_args(pretrained, out, *extra):
    from tests.conftest import TINY

    return ["run", *TINY, *META, "workflow=meta_train", f"meta.pretrained={pretrained}", f"output_dir={out}", *extra]


def test_meta_training_resume_is_exact_and_logs(tmp_path, pretrained):
    full, split = tmp_path / "full", tmp_path / "split"
    assert invoke(*meta_args(pretrained, full, "meta.outer_steps=4")).exit_code == 0
    assert invoke(*meta_args(pretrained, split, "meta.outer_steps=2")).exit_code == 0
    result = invoke(*meta_args(pretrained, split, "meta.outer_steps=4"), "--resume")
    assert result.exit_code == 0, result.output
    a, b = rater_tensors(full, 4), rater_tensors(split, 4)
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = rater_tensors(full, 2)
    assert any(not torch.equal(a[k], start[k]) for k in a)  # the rater did move

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(full / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"meta/val_loss", "meta/grad_norm", "meta/score_std", "meta/weight_entropy"} <= tags
    entropy = [e.value for e in acc.Scalars("meta/weight_entropy")]
    assert all(0 < h <= torch.log(torch.tensor(3.0)).item() + 1e-6 for h in entropy)


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_in_meta_training(tmp_path, pretrained):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name, n in (("one", 1), ("two", 2)):
        args = meta_args(pretrained, tmp_path / name, "meta.outer_steps=2", "meta.subproblems=2")
        proc = subprocess.run([sys.executable, "-m", "noisevalue.cli", *args[0:1], *args[1:],
                               "--nproc-per-node", str(n)], capture_output=True, text=True, env=env, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = rater_tensors(tmp_path / "one", 2), rater_tensors(tmp_path / "two", 2)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=1e-5, atol=1e-6)


class NaNAfter(MetaOptimizer):
    """A meta-optimizer that breaks at its third call."""

    calls = 0

    def __init__(self):
        from noisevalue.meta.one_step import OneStep

        self.inner = OneStep()

    def meta_gradient(self, problem, theta, eta):
        NaNAfter.calls += 1
        result = self.inner.meta_gradient(problem, theta, eta)
        if NaNAfter.calls >= 3:
            return MetaGradient({k: torch.full_like(v, float("nan")) for k, v in result.grad.items()},
                                result.theta, result.outer_loss, {})
        return result


def test_nan_meta_gradient_stops_and_keeps_last_good_rater(tmp_path, pretrained):
    registry.register("meta_optimizer", "nan_after_two")(NaNAfter)
    NaNAfter.calls = 0
    try:
        out = tmp_path / "nan"
        result = invoke(*meta_args(pretrained, out, "meta.outer_steps=5", "meta.ckpt_every=10",
                                   "meta.optimizer.name=nan_after_two", "~meta.optimizer.params"))
    finally:
        registry.reset()
    assert result.exit_code == 2
    assert "meta-gradient became NaN/inf at outer step 3" in result.stderr
    assert (out / "checkpoints" / "step_0000002" / "rater.safetensors").is_file()
    good = rater_tensors(out, 2)
    assert all(torch.isfinite(v).all() for v in good.values())


@pytest.mark.parametrize(
    "override, expected",
    [
        ("meta.group_size=1", "meta.group_size: Input should be greater than or equal to 2"),
        ("meta.inner_steps=0", "meta.inner_steps: Input should be greater than or equal to 1"),
        ("meta.val_fraction=0.0001", "meta.val_fraction: 0.0001 of"),
        ("meta.groups=5", "meta.groups: 5 is not divisible by meta.subproblems"),
    ],
)
def test_meta_bad_input(tmp_path, pretrained, override, expected):
    result = invoke(*meta_args(pretrained, tmp_path / "bad", "meta.outer_steps=1", override, "meta.subproblems=2"))
    assert result.exit_code == 2, result.output
    assert expected in result.stderr and result.stderr.strip().count("\n") == 0


def test_selector_bad_input(tmp_path, pretrained, tiny_overrides):
    result = invoke("run", *tiny_overrides, "train.selector={name: max_norm, params: {k: 0}}")
    assert result.exit_code == 2 and "train.selector (max_norm)" in result.stderr and "k" in result.stderr
    result = invoke("run", *tiny_overrides, "train.selector={name: rater, params: {k: 2}}")
    assert result.exit_code == 2 and "checkpoint" in result.stderr


def test_rater_checkpoint_that_does_not_fit_the_backbone(tmp_path, tiny_overrides):
    from noisevalue import checkpoint
    from noisevalue.raters.dual_stream import dual_stream_tiny

    rater = dual_stream_tiny(input_size=4, in_channels=2, num_classes=3, hidden_size=32, depth=1, num_heads=2)
    params = {"input_size": 4, "in_channels": 2, "num_classes": 3, "hidden_size": 32, "depth": 1, "num_heads": 2}
    checkpoint.save_checkpoint(tmp_path / "r", 1, {"rater": rater.state_dict()}, {"rater": {"name": "dual_stream_tiny", "params": params}})
    result = invoke("run", *tiny_overrides, f"train.selector={{name: rater, params: {{k: 2, checkpoint: {tmp_path / 'r'}}}}}")
    assert result.exit_code == 2, result.output
    assert "(2, 4, 4)" in result.stderr and "(1, 8, 8)" in result.stderr


def test_protocol_end_to_end_with_skip_on_rerun(tmp_path, tiny_overrides):
    args = ["run", *tiny_overrides, *META, "workflow=protocol", "meta.outer_steps=2",
            "select.steps=4", "select.eval_every=2", "eval.evaluators=[{name: fid, params: {features: digits}}]",
            "eval.num_samples=20", "eval.baselines=false"]
    result = invoke(*args)
    assert result.exit_code == 0, (result.output, result.exception)
    root = tmp_path / "run"
    rows = list(csv.DictReader((root / "comparison.csv").open()))
    methods = {r["run"] for r in rows}
    assert methods == {"vanilla", "rater", "max_norm", "min_norm"}
    assert {int(r["step"]) for r in rows} == {4, 6, 8}  # start + each evaluation
    md = (root / "comparison.md").read_text()
    assert "| run | start (step 4) | +2 | +4 |" in md
    assert "One seed (0)" in md  # nothing is called significant on one seed
    assert (root / "comparison.png").stat().st_size > 0
    starts = {r["fd_digits"] for r in rows if r["step"] == "4"}
    assert len(starts) == 1  # every method continues from the same checkpoint
    again = invoke(*args)
    assert again.exit_code == 0
    assert again.output.count("reused") == 6
