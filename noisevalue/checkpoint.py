"""Checkpoints: safetensors for tensors, JSON for metadata; atomic; no pickle.

A checkpoint is a folder ``step_0001000/`` holding ``model.safetensors``,
``ema.safetensors`` (optional), ``optimizer.safetensors`` (optimizer state tensors) and
``meta.json`` (a :class:`CheckpointMeta`: step, what the weights are, optimizer
hyper-parameters).
It is written into a temporary sibling folder and renamed into place, so a crash never
leaves a half-written checkpoint under its final name; ``latest`` names the newest one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, ValidationError

from noisevalue import faults
from noisevalue.errors import CheckpointError

META = "meta.json"
LATEST = "latest"
_PREFIX = "step_"


class Identity(BaseModel):
    """A registered component a checkpoint holds: its registry name and constructor params
    (shapes filled in), enough to rebuild it before loading the weights."""

    model_config = ConfigDict(extra="forbid")

    name: str
    params: dict[str, Any] = {}


class CheckpointMeta(BaseModel):
    """``meta.json`` of a checkpoint, read only through :func:`read_meta`.

    A diffusion checkpoint (stage i or iii) has ``backbone``, ``latent_shape``,
    ``num_classes`` and ``diffusion``; a rater checkpoint (stage ii) has ``rater`` and the
    ``pretrained`` diffusion checkpoint it was meta-trained on. Unknown keys are kept.
    """

    model_config = ConfigDict(extra="allow")

    step: int
    backbone: Identity | None = None
    rater: Identity | None = None
    optimizer: dict[str, Any] | None = None  # param groups and scalar state (tensors aside)
    recipe: str | None = None
    seed: int | None = None
    latent_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    diffusion: dict[str, Any] | None = None
    pretrained: str | None = None
    meta: dict[str, Any] | None = None  # the meta-training settings
    inner_step: int | None = None  # steps taken by a carried inner optimizer
    log_window: dict[str, float] | None = None  # the training-loss window open at this step
    skipped: int | None = None  # steps skipped so far for a non-finite loss (train.nonfinite=skip)

    @property
    def is_diffusion(self) -> bool:
        return None not in (self.backbone, self.latent_shape, self.num_classes, self.diffusion)

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json", exclude_none=True), indent=2, sort_keys=True)


def step_dir_name(step: int) -> str:
    return f"{_PREFIX}{step:07d}"


def publish(tmp: str | Path, path: str | Path) -> None:
    """Move a finished temporary file or folder into place atomically, with the permissions
    a plain ``open`` or ``mkdir`` would have given it (``mkstemp`` makes them private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(tmp, (0o777 if Path(tmp).is_dir() else 0o666) & ~mask)
    if Path(tmp).is_dir():  # and the files in it (safetensors writes them private)
        for inner in Path(tmp).rglob("*"):
            os.chmod(inner, (0o777 if inner.is_dir() else 0o666) & ~mask)
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside ``path`` for the block to write; published to ``path`` when
    the block ends, removed when it fails, so ``path`` is never half-written. ``suffix``:
    for writers that pick the format from the name (``.png``, ``.npz``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        publish(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def optimizer_to_flat(opt_state: Mapping[str, Any]) -> tuple[dict[str, torch.Tensor], dict]:
    """Split ``optimizer.state_dict()`` into tensors and a JSON-able remainder."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in opt_state["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{key}"] = value.detach().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    groups = [
        {k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()}
        for g in opt_state["param_groups"]
    ]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_from_flat(tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any]) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    root: str | Path,
    tensors: Mapping[str, Mapping[str, torch.Tensor]],
    meta: CheckpointMeta,
    keep: int | None = None,
    keep_every: int | None = None,
) -> Path:
    """Write ``{name}.safetensors`` per tensor group plus ``meta.json`` atomically, as
    ``root/step_<meta.step>``.

    Only the newest ``keep`` checkpoints are retained, except those at multiples of
    ``keep_every``, which are never pruned (a trajectory to analyse or transfer from).
    """
    from safetensors.torch import save_file

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_dir_name(meta.step)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        for name, group in tensors.items():
            flat = {k: v.detach().cpu().contiguous() for k, v in group.items()}
            save_file(flat, str(tmp / f"{name}.safetensors"))
        (tmp / META).write_text(meta.to_json())
        faults.point("checkpoint.written")
        if final.exists():  # re-saving the same step (e.g. after resume): swap atomically
            old = root / f".{final.name}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            publish(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            publish(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    atomic_write_text(root / LATEST, final.name + "\n")
    faults.point("checkpoint.published")
    prune(root, keep, keep_every)
    return final


def prune(root: str | Path, keep: int | None, keep_every: int | None = None) -> None:
    """Retire all but the newest ``keep`` checkpoints under ``root`` (None: keep all),
    except those at multiples of ``keep_every``. Run after each save and when a trainer
    starts, so a kill between publishing and pruning leaves nothing extra behind."""
    if keep is None:
        return
    for old_dir in list_checkpoints(root)[:-keep]:
        if keep_every and checkpoint_step(old_dir) % keep_every == 0:
            continue
        retire(old_dir)


def retire(path: Path) -> None:
    """Remove a checkpoint folder atomically: renamed to a hidden name first (so no listing
    can see it half-deleted), then deleted."""
    hidden = path.with_name(f".{path.name}.retired")
    os.replace(path, hidden)
    faults.point("checkpoint.retiring")
    shutil.rmtree(hidden, ignore_errors=True)


def remove_leftovers(root: str | Path) -> list[Path]:
    """Delete what a killed writer left under ``root``: temporary files and folders
    (``.*.tmp``, ``.*.old``) and half-retired checkpoints (``.*.retired``). Returns them."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.name.startswith(".") and p.name.endswith((".tmp", ".old", ".retired"))]
    for p in found:
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return found


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_PREFIX)]
    return sorted((p for p in found if (p / META).is_file()), key=lambda p: p.name)


def checkpoint_step(path: str | Path) -> int:
    """The step of a checkpoint folder, from its name (``step_0001500`` -> 1500)."""
    return int(Path(path).name[len(_PREFIX):])


def latest_checkpoint(root: str | Path) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest checkpoint) or a checkpoints folder."""
    path = Path(path)
    if (path / META).is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = latest_checkpoint(root)
        if found is not None:
            return found
    raise CheckpointError(f"checkpoint '{path}': no checkpoint found there")


def read_meta(ckpt: str | Path) -> CheckpointMeta:
    """The checkpoint folder's ``meta.json``; a missing, corrupt or malformed one is a
    CheckpointError."""
    ckpt = Path(ckpt)
    try:
        data = json.loads((ckpt / META).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint '{ckpt}': {META} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"checkpoint '{ckpt}': {META} is corrupt ({exc})") from None
    if not isinstance(data, dict) or "step" not in data:
        raise CheckpointError(f"checkpoint '{ckpt}': {META} has no 'step'")
    try:
        return CheckpointMeta.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise CheckpointError(f"checkpoint '{ckpt}': {META} '{where}': {err['msg']}") from None


def require_diffusion(ckpt: str | Path, what: str) -> CheckpointMeta:
    """``meta.json`` of a checkpoint that must be a diffusion checkpoint; a CheckpointError
    saying what it is otherwise (``what``: the command or recipe key asking)."""
    meta = read_meta(ckpt)
    if not meta.is_diffusion:
        kind = "a rater checkpoint" if meta.rater is not None else "not a diffusion checkpoint"
        raise CheckpointError(f"{what}: '{ckpt}' is {kind} ({META} names no backbone, latent shape and schedule)")
    return meta


def require_optimizer_state(ckpt: str | Path, where: str) -> CheckpointMeta:
    """``meta.json`` of a checkpoint that must hold the trainer's optimizer state; a
    CheckpointError naming ``where`` (the recipe key that needs it) otherwise."""
    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    if meta.optimizer is None or not (ckpt / "optimizer.safetensors").is_file():
        raise CheckpointError(
            f"{where} needs the optimizer state saved with the diffusion checkpoint, but "
            f"'{ckpt}' holds none; use meta.inner_optimizer=sgd or adamw_fresh"
        )
    return meta


def load_tensors(ckpt: str | Path, name: str, device: str | torch.device = "cpu") -> dict:
    """Load one tensor group; a truncated or corrupt file is a CheckpointError."""
    from safetensors.torch import load_file

    path = Path(ckpt) / f"{name}.safetensors"
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{ckpt}': {path.name} is missing")
    try:
        return load_file(str(path), device=str(device))
    except Exception as exc:
        raise _corrupt(path, exc) from None


def check_files(ckpt: str | Path) -> None:
    """Every tensor file of a checkpoint has a whole header and covers its data, checked
    without loading the tensors; a CheckpointError otherwise, as :func:`load_tensors` gives."""
    from safetensors import safe_open

    for path in sorted(Path(ckpt).glob("*.safetensors")):
        try:
            with safe_open(str(path), "pt"):
                pass
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type
            raise _corrupt(path, exc) from None


def _corrupt(path: Path, exc: Exception) -> CheckpointError:
    reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return CheckpointError(f"checkpoint file '{path}' is corrupt or truncated ({reason})")


def load_state_into(module: torch.nn.Module, state: Mapping[str, torch.Tensor], where: str) -> None:
    """``load_state_dict(strict=True)`` with a one-line error naming the mismatch."""
    check_state(module.state_dict(), state, where)
    module.load_state_dict(dict(state), strict=True)


def check_state(own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], where: str) -> None:
    """CheckpointError unless ``state`` has exactly the names and shapes of ``own``."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(
            f"{where}: parameter names do not match the model "
            f"({len(missing)} missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, "
            f"e.g. {unexpected[:2]})"
        )
    for key, value in state.items():
        if tuple(own[key].shape) != tuple(value.shape):
            raise CheckpointError(
                f"{where}: '{key}' has shape {tuple(value.shape)} in the checkpoint but "
                f"{tuple(own[key].shape)} in the model"
            )
