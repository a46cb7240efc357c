"""Weights & Biases (offline) and MLflow (a local store) receive what TensorBoard receives:
the scalars read back equal, the sample grids, the recipe, the stage structure; a resumed run
logs on to the same tracked run; a missing package is one line at ``recipe validate``."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from noisevalue.cli import app
from tests.conftest import TINY

runner = CliRunner()
BACKENDS = ["log.backends=[tensorboard,wandb,mlflow]", "log.wandb_mode=offline", "log.project=nv-test"]


def wandb_records(run_dir: Path) -> list:
    """The records of W&B's offline run files, oldest first (one per process that logged to
    the run: a resumed run adds one with the same id, which ``wandb sync`` joins)."""
    return [r for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")) for r in _records(path)]


def _records(path: Path) -> list:
    """One offline run file: a LevelDB-style log of protobuf records (a 7-byte header, 32 KiB
    blocks, each record a 7-byte header and its data, maybe split over blocks)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block = path.read_bytes(), 7, 32768
    chunks, pending = [], b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            pending = chunk
        else:  # middle, last
            pending += chunk
        if kind in (1, 4):
            chunks.append(pending)
    records = []
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        records.append(record)
    return records


def wandb_history(records, tag: str) -> dict[int, float]:
    out = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
            if tag in items:
                out[int(items["_step"])] = float(items[tag])
    return out


def tensorboard(run_dir: Path, tag: str) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


def mlflow_run(run_dir: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    run_id = json.loads((run_dir / "trackers.json").read_text())["mlflow"]
    return client, run_id


@pytest.fixture(scope="module")
def tracked(tmp_path_factory):
    """A 4-step run with checkpoints at 2 and 4, stopped after 2 and resumed."""
    run = tmp_path_factory.mktemp("tracked") / "run"
    args = ["run", *TINY, f"output_dir={run}", *BACKENDS, "eval.every=2"]
    first = runner.invoke(app, [*args, "train.steps=2"])
    assert first.exit_code == 0, first.output
    ids = json.loads((run / "trackers.json").read_text())
    resumed = runner.invoke(app, [*args, "--resume", "--allow-changes", "train.steps"])
    assert resumed.exit_code == 0, resumed.output
    return run, ids


def test_the_trackers_hold_the_scalars_tensorboard_holds(tracked):
    run, ids = tracked
    assert json.loads((run / "trackers.json").read_text()) == ids  # the resume logged on to the same runs
    files = sorted(run.glob("wandb/offline-run-*/run-*.wandb"))
    assert [f.name for f in files] == [f"run-{ids['wandb']}.wandb"] * 2  # one run, logged by two processes
    records = wandb_records(run)
    client, run_id = mlflow_run(run)
    for tag in ("train/loss", "eval/heldout_loss"):
        tb = tensorboard(run, tag)
        assert sorted(tb) == ([1, 2, 3, 4] if tag == "train/loss" else [2, 4])
        wb = wandb_history(records, tag)
        ml = {m.step: m.value for m in client.get_metric_history(run_id, tag)}
        assert sorted(wb) == sorted(ml) == sorted(tb), tag
        for step, value in tb.items():  # TensorBoard keeps float32
            assert np.float32(wb[step]) == value and np.float32(ml[step]) == value, (tag, step)


def test_the_trackers_hold_the_recipe_the_grids_and_the_stage(tracked):
    run, ids = tracked
    records = wandb_records(run)
    first = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    config = {u.key: json.loads(u.value_json) for u in first.config.update}
    assert first.run_id == ids["wandb"] and first.project == "nv-test"
    assert config["name"] == "digits" and config["train"]["global_batch_size"] == 8
    assert first.run_group == run.name and first.job_type == run.name
    assert list(run.glob("wandb/offline-run-*/files/media/images/samples_*.png"))
    client, run_id = mlflow_run(run)
    tracked_run = client.get_run(run_id)
    assert tracked_run.data.params["train.global_batch_size"] == "8"
    assert tracked_run.data.tags["noisevalue.stage"] == run.name
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert "recipe.yaml" in artifacts and "images" in artifacts
    assert list(run.glob("mlartifacts/*/artifacts/recipe.yaml"))  # beside the store, not in the working directory


def test_a_protocol_stage_is_grouped_under_its_experiment(tmp_path):
    from noisevalue.config import load_recipe
    from noisevalue.experiments import stages

    recipe = load_recipe("digits", [f"output_dir={tmp_path / 'exp'}"])
    stage = stages.stage_recipe(recipe, tmp_path / "exp" / "rater-seed3")
    assert stage.log.group == "exp"
    assert stage.log.mlflow_tracking_uri == f"sqlite:///{(tmp_path / 'exp' / 'mlflow.db').resolve()}"
    again = stages.stage_recipe(stage, tmp_path / "exp" / "rater-seed3" / "inner")  # kept, not renamed
    assert again.log.group == "exp"


def test_a_missing_tracker_is_one_line_at_validate(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    result = runner.invoke(app, ["recipe", "validate", "digits", "log.backends=[tensorboard,wandb]", "--no-files"])
    assert result.exit_code == 2
    assert result.output.strip() == ("noisevalue: error: log.backends: 'wandb' needs the wandb package, which is not "
                                     "installed; pip install 'noisevalue[wandb]', or remove it from log.backends")
