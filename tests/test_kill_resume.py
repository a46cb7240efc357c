"""Fault injection: a real ``noisevalue run`` process is killed (SIGKILL, as ``kill -9`` or
a preemption) at named points, then resumed; every file it leaves must equal the
uninterrupted run's byte for byte. Only the files that hold wall-clock times (TensorBoard's
event files, ``timings.jsonl``, ``timings.json``) are left out of the comparison."""

import hashlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from noisevalue import faults
from tests.conftest import TINY

# 8 steps, a checkpoint every 2 with 2 kept (pruning), a log window of 3 that checkpoints
# cut, an evaluation (held-out loss and a sample grid) every 4
SETTINGS = [*TINY, "train.steps=8", "train.ckpt_every=2", "train.keep_checkpoints=2", "train.log_every=3",
            "eval.every=4"]
IGNORED = {"tb", "timings.jsonl", "timings.json", "compare_timings.md"}  # wall-clock times

TRIALS = [
    ("train.step", 3),  # mid log window, a step past the checkpoint
    ("checkpoint.written", 2),  # step 4's files written, not published
    ("checkpoint.published", 2),  # step 4 published, its evaluation not run
    ("evaluate.grid", 1),  # step 4's grid written, its metrics not
    ("checkpoint.retiring", 1),  # step 2 renamed away for pruning, not deleted
    ("checkpoint.published", 4),  # the last checkpoint published, the final evaluation not run
]


def files(run: Path) -> dict:
    return {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and not IGNORED & set(p.relative_to(run).parts)
    }


def noisevalue_run(out: Path, *extra: str, kill_at: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop(faults.ENV, None)
    if kill_at:
        env[faults.ENV] = kill_at
    return subprocess.run([sys.executable, "-m", "noisevalue.cli", "run", *SETTINGS, f"output_dir={out}", *extra],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("kill")
    out = root / "run"
    result = noisevalue_run(out)
    assert result.returncode == 0, result.stderr
    reference = files(out)
    shutil.move(out, root / "reference")
    return root, reference


def test_every_point_is_a_known_fault_point():
    assert {name for name, _ in TRIALS} == set(faults.POINTS)


@pytest.mark.parametrize("point, count", TRIALS, ids=[f"{p}:{c}" for p, c in TRIALS])
def test_a_killed_run_resumes_to_the_same_files(uninterrupted, point, count):
    root, reference = uninterrupted
    out = root / "run"  # the same path as the reference run: recipe.yaml names it
    shutil.rmtree(out, ignore_errors=True)
    killed = noisevalue_run(out, kill_at=f"{point}:{count}")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    resumed = noisevalue_run(out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    got = files(out)
    assert sorted(got) == sorted(reference), f"files differ: {sorted(set(got) ^ set(reference))}"
    differ = [name for name in reference if got[name] != reference[name]]
    assert not differ, f"contents differ after a kill at {point}:{count}: {differ}"
    shutil.rmtree(out)


META_TRIALS = [("checkpoint.published", 1), ("checkpoint.retiring", 1)]


@pytest.mark.parametrize("point, count", META_TRIALS, ids=[f"{p}:{c}" for p, c in META_TRIALS])
def test_a_killed_meta_training_resumes_to_the_same_files(uninterrupted, point, count):
    """Rater meta-training (carried theta and inner AdamW state) killed and resumed."""
    from tests.test_protocol import META

    root, _ = uninterrupted
    settings = [*META, "workflow=meta_train", f"meta.pretrained={root / 'reference'}", "meta.outer_steps=6",
                "meta.reset_theta=false", "meta.inner_optimizer=adamw_fresh", "train.keep_checkpoints=1"]
    reference = root / "meta_reference"
    if not reference.is_dir():
        out = root / "meta"
        assert noisevalue_run(out, *settings).returncode == 0
        shutil.move(out, reference)
    out = root / "meta"
    shutil.rmtree(out, ignore_errors=True)
    killed = noisevalue_run(out, *settings, kill_at=f"{point}:{count}")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    assert noisevalue_run(out, *settings, "--resume").returncode == 0
    assert files(out) == files(reference)
    shutil.rmtree(out)


PROTOCOL_TRIALS = [("checkpoint.published", 6), ("evaluate.grid", 3)]


@pytest.mark.parametrize("point, count", PROTOCOL_TRIALS, ids=[f"{p}:{c}" for p, c in PROTOCOL_TRIALS])
def test_a_killed_protocol_reruns_to_the_same_files(tmp_path_factory, point, count):
    """The whole protocol (stage i, the raters, the continuations, the tables), killed in a
    later stage and run again: every file equals the uninterrupted run's."""
    from tests.test_protocol import META

    root = tmp_path_factory.getbasetemp() / "protocol"
    settings = [*META, "workflow=protocol", "meta.outer_steps=2", "select.steps=4", "select.eval_every=2",
                "eval.num_samples=20", "eval.baselines=false", "train.steps=4"]
    reference = root / "reference"
    if not reference.is_dir():
        out = root / "run"
        result = noisevalue_run(out, *settings)
        assert result.returncode == 0, result.stderr
        shutil.move(out, reference)
    out = root / "run"
    shutil.rmtree(out, ignore_errors=True)
    killed = noisevalue_run(out, *settings, kill_at=f"{point}:{count}")
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    rerun = noisevalue_run(out, *settings)  # the protocol reuses finished stages and resumes the others
    assert rerun.returncode == 0, rerun.stderr
    got, want = files(out), files(reference)
    assert sorted(got) == sorted(want), f"files differ: {sorted(set(got) ^ set(want))}"
    assert [k for k in want if got[k] != want[k]] == []
    shutil.rmtree(out)
