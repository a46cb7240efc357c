"""Experiment trackers beside TensorBoard: Weights & Biases and MLflow (``log.backends``).

Each receives what TensorBoard receives (every scalar, the sample grids) and, once, the
resolved recipe and the run's place in its experiment: W&B's ``group`` and ``job_type``, or
MLflow tags, name the protocol (``log.group``, by default its folder) and the stage (the run
folder's name), so the stages of one protocol sit together. A run's tracker ids are kept in
``trackers.json`` in its folder, so a resumed run goes on logging to the same tracked run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from noisevalue.checkpoint import atomic_write_text
from noisevalue.config import Recipe

IDS = "trackers.json"


def _ids(run_dir: Path) -> dict[str, str]:
    path = run_dir / IDS
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _keep_id(run_dir: Path, backend: str, run_id: str) -> None:
    atomic_write_text(run_dir / IDS, json.dumps({**_ids(run_dir), backend: run_id}, indent=1, sort_keys=True))


def group_of(recipe: Recipe, run_dir: Path) -> str:
    return recipe.log.group or run_dir.resolve().name


def mlflow_uri(recipe: Recipe, run_dir: Path) -> str:
    """``log.mlflow_tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a SQLite store in the
    run's folder (a protocol's stages get the protocol folder's, see ``stages.stage_recipe``)."""
    return (recipe.log.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
            or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")


def to_hwc_uint8(image: Any) -> np.ndarray:
    """A ``[C, H, W]`` image in [0, 1] (torch or numpy) as uint8 ``[H, W, C]``."""
    array = np.asarray(image.detach().cpu() if hasattr(image, "detach") else image, dtype=np.float32)
    return (np.clip(array, 0, 1) * 255).round().astype(np.uint8).transpose(1, 2, 0)


class WandbTracker:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool) -> None:
        import wandb

        previous = _ids(run_dir).get("wandb") if resume else None
        log = recipe.log
        self.run = wandb.init(
            project=log.project, entity=log.wandb_entity, mode=log.wandb_mode, dir=str(run_dir),
            group=group_of(recipe, run_dir), job_type=run_dir.resolve().name, name=run_dir.resolve().name,
            config=recipe.model_dump(mode="json"), id=previous, resume="allow" if previous else None,
            reinit="create_new",
        )
        _keep_id(run_dir, "wandb", self.run.id)

    def scalars(self, values: dict[str, float], step: int) -> None:
        self.run.log({k: float(v) for k, v in values.items()}, step=step)

    def image(self, tag: str, image: Any, step: int) -> None:
        import wandb

        self.run.log({tag: wandb.Image(to_hwc_uint8(image))}, step=step)

    def close(self) -> None:
        self.run.finish()


class MLflowTracker:
    def __init__(self, recipe: Recipe, run_dir: Path, resume: bool) -> None:
        from mlflow.tracking import MlflowClient

        uri = mlflow_uri(recipe, run_dir)
        self.client = MlflowClient(tracking_uri=uri)
        log = recipe.log
        previous = _ids(run_dir).get("mlflow") if resume else None
        if previous is not None:
            self.run_id = previous
            self.client.update_run(previous, status="RUNNING")
        else:
            experiment = self.client.get_experiment_by_name(log.project)
            # a local store keeps its artifacts beside it (MLflow's default is ./mlruns of the working directory)
            store = Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" if uri.startswith("sqlite:///") else None
            experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
                log.project, artifact_location=store.resolve().as_uri() if store else None)
            tags = {"noisevalue.group": group_of(recipe, run_dir), "noisevalue.stage": run_dir.resolve().name,
                    "noisevalue.workflow": recipe.workflow, "noisevalue.run_dir": str(run_dir.resolve())}
            self.run_id = self.client.create_run(experiment_id, run_name=run_dir.resolve().name, tags=tags).info.run_id
            self._params(recipe)
            _keep_id(run_dir, "mlflow", self.run_id)

    def _params(self, recipe: Recipe) -> None:
        import yaml
        from mlflow.entities import Param

        flat: dict[str, str] = {}
        _flatten(recipe.model_dump(mode="json"), "", flat)
        params = [Param(k, v[:6000]) for k, v in sorted(flat.items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per call
            self.client.log_batch(self.run_id, params=params[i:i + 100])
        self.client.log_text(self.run_id, yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False),
                             "recipe.yaml")

    def scalars(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def image(self, tag: str, image: Any, step: int) -> None:
        self.client.log_image(self.run_id, to_hwc_uint8(image), key=tag, step=step)

    def close(self) -> None:
        self.client.set_terminated(self.run_id)


def _flatten(node: Any, prefix: str, out: dict[str, str]) -> None:
    if isinstance(node, dict) and node:
        for k, v in node.items():
            _flatten(v, f"{prefix}.{k}" if prefix else str(k), out)
    else:
        out[prefix] = json.dumps(node) if not isinstance(node, str) else node


BACKENDS = {"wandb": WandbTracker, "mlflow": MLflowTracker}


def open_trackers(recipe: Recipe, run_dir: Path, resume: bool) -> list[Any]:
    """The trackers of ``log.backends`` (TensorBoard is the run log's own)."""
    return [BACKENDS[b](recipe, run_dir, resume) for b in recipe.log.backends if b in BACKENDS]
