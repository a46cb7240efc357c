"""``noisevalue sample``: DDIM samples of a trained run, written in the ADM ``.npz`` format.

What a sample is depends only on its index: image ``i`` starts from noise drawn by a
generator seeded with ``(seed, i, STREAM_SAMPLES)``, and the DDIM steps (``eta > 0``) draw
their noise from the same generator. Work is cut into shards of ``batch_size`` consecutive
images; each shard is one batch of the model, written to ``shards/`` as soon as it is done
(temporary file + rename), so

* any number of processes gives exactly the images of one process (each rank takes a
  disjoint set of whole shards; a shard's batch is the same whoever samples it);
* an interrupted run continues where it stopped: shards already on disk are skipped;
* once every shard is there, rank 0 streams them into ``samples.npz`` (``arr_0`` uint8
  ``[N, H, W, C]``, ``arr_1`` int64 labels when class-conditional), writes ``grid.png``
  and removes ``shards/``. A folder with ``samples.npz`` is complete and is reused.

Multi-process runs start job ``sample`` of :mod:`noisevalue.jobs` on every rank; each reads
the settings the CLI wrote to ``<out>/settings.json``.
"""

from __future__ import annotations

import json
import shutil
import zipfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from noisevalue import checkpoint as ckpt
from noisevalue import registry
from noisevalue.backbones.dit_formats import (
    WEIGHTS,
    ForeignWeights,
    diffusers_folder,
    read_foreign,
    shape_params,
)
from noisevalue.config import (
    RESOLVED_RECIPE,
    STAGE_SETTINGS,
    Component,
    DiffusionConfig,
    Recipe,
    load_recipe,
    load_recipe_dict,
    parse_recipe,
    set_dotted,
    uses_cuda,
)
from noisevalue.distributed import DistInfo, barrier
from noisevalue.errors import CheckpointError, ConfigError, DataError
from noisevalue.files import display_path
from noisevalue.train.batches import STREAM_SAMPLES, image_generators

__all__ = [
    "GRID_FILE",
    "SAMPLES_FILE",
    "SETTINGS_FILE",
    "SHARDS_DIR",
    "STREAM_SAMPLES",
    "RunContext",
    "SampleSettings",
    "Sampler",
    "default_out_dir",
    "display_path",
    "image_generators",
    "prepare_out_dir",
    "read_settings",
    "resolve_run",
    "run_sampling",
    "sample_settings",
    "to_uint8_nhwc",
    "write_images_npz",
]

SAMPLES_FILE = "samples.npz"
GRID_FILE = "grid.png"
SETTINGS_FILE = "settings.json"
SHARDS_DIR = "shards"
RECIPE_SEARCH_DEPTH = 3  # how many folders above a run to look for recipe.yaml
# settings that do not change the images: where they are drawn, and where the checkpoint
# lies now (the weights are identified by weights_fingerprint)
_PLACEMENT = ("checkpoint", "device", "threads")


# -------------------------------------------------------------------------- the run
@dataclass
class RunContext:
    """A diffusion checkpoint and the recipe it was trained with."""

    checkpoint: Path
    run_dir: Path
    meta: ckpt.CheckpointMeta  # a diffusion checkpoint's
    recipe: Recipe
    recipe_source: str  # where the recipe came from, for messages

    @property
    def step(self) -> int:
        return self.meta.step

    @property
    def num_classes(self) -> int:
        assert self.meta.num_classes is not None
        return self.meta.num_classes

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        assert self.meta.latent_shape is not None
        return self.meta.latent_shape


def resolve_run(path: str | Path, recipe: str | Path | None = None) -> RunContext:
    """The newest checkpoint of a run (or the given checkpoint) and its recipe.

    ``path``: a run folder, its ``checkpoints/`` folder or a ``step_XXXXXXX`` folder. The
    model, diffusion schedule, latent shape and class count come from the checkpoint's
    ``meta.json``; the rest (encoder, sampling and evaluation defaults) from ``recipe`` if
    given, else from ``recipe.yaml`` in the run folder or the nearest folder above it
    (a protocol stage such as ``runs/digits/pretrain`` uses ``runs/digits/recipe.yaml``,
    updated with the stage's own ``stage.json``).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"'{path}' not found: expected a run folder or a checkpoint folder")
    weights = read_foreign(path)
    if weights is not None:
        return _foreign_run(path, weights, recipe)
    checkpoint = ckpt.resolve_checkpoint(path)
    meta = ckpt.require_diffusion(checkpoint, "noisevalue sample")
    parent = checkpoint.parent
    run_dir = parent.parent if parent.name == "checkpoints" else parent
    parsed, source = _load_run_recipe(run_dir, recipe)
    return RunContext(checkpoint, run_dir, meta, parsed, source)


def _foreign_run(path: Path, weights: ForeignWeights, recipe: str | Path | None) -> RunContext:
    """Weights from outside noisevalue (an official DiT file, a diffusers folder) as a run:
    the recipe gives the backbone's name, the schedule, the encoder and the sampling
    settings; the weights give the shapes (and diffusers' numerics)."""
    if recipe is None:
        raise ConfigError(f"'{path}' holds {weights.layout} weights from outside noisevalue; pass --recipe RECIPE "
                          "(its model name, noise schedule, encoder and sampling settings)")
    parsed = load_recipe(recipe)
    null = float(parsed.model.params.get("class_dropout_prob", 0.1)) > 0
    shapes = shape_params(weights.state, null, f"'{path}'")
    params = {**parsed.model.params, **shapes, **weights.numerics}
    meta = ckpt.CheckpointMeta(
        step=0, backbone=ckpt.Identity(name=parsed.model.name, params=params), seed=parsed.seed,
        latent_shape=(shapes["in_channels"], shapes["input_size"], shapes["input_size"]),
        num_classes=shapes["num_classes"], diffusion=parsed.diffusion.model_dump(),
    )
    return RunContext(path, path.parent if path.is_file() else path, meta, parsed, str(recipe))


def weights_file(checkpoint: Path, use_ema: bool) -> Path:
    """The file holding the weights to sample: a checkpoint's ``ema`` or ``model`` tensors,
    or the foreign weights' own file."""
    if checkpoint.is_file():
        return checkpoint
    folder = diffusers_folder(checkpoint)
    if folder is not None:
        return next((folder / n for n in WEIGHTS if (folder / n).is_file()), folder / WEIGHTS[0])
    return checkpoint / f"{'ema' if use_ema else 'model'}.safetensors"


def _load_run_recipe(run_dir: Path, explicit: str | Path | None) -> tuple[Recipe, str]:
    if explicit is not None:
        return load_recipe(explicit), str(explicit)
    for folder in [run_dir, *list(run_dir.resolve().parents)[:RECIPE_SEARCH_DEPTH]]:
        found = folder / RESOLVED_RECIPE
        if found.is_file():
            break
    else:
        raise ConfigError(
            f"no {RESOLVED_RECIPE} in '{run_dir}' or the {RECIPE_SEARCH_DEPTH} folders above it: pass "
            "--recipe FILE (the recipe the run was trained with)"
        )
    data = load_recipe_dict(found)
    label = display_path(found)
    stage = run_dir / STAGE_SETTINGS
    if folder.resolve() != run_dir.resolve() and stage.is_file():
        try:
            settings = json.loads(stage.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"'{stage}' is corrupt ({exc})") from None
        for dotted, value in settings.items():
            set_dotted(data, dotted, value)
        label = f"{display_path(found)} + {display_path(stage)}"
    data["workflow"] = "pretrain"  # what a diffusion checkpoint was trained by
    data["output_dir"] = str(run_dir)
    return parse_recipe(data, label), label


# -------------------------------------------------------------------------- settings
@dataclass
class SampleSettings:
    """Everything that decides the samples (and, last, where they are drawn)."""

    checkpoint: str
    step: int
    backbone: dict[str, Any]
    diffusion: dict[str, Any]
    encoder: dict[str, Any]
    latent_shape: list[int]
    num_classes: int
    num: int
    num_steps: int
    cfg_scale: float
    eta: float
    seed: int
    use_ema: bool
    class_label: int | None
    batch_size: int
    weights_fingerprint: str = ""  # identifies the weights file wherever the run is moved
    device: str = "auto"
    threads: int | None = None
    precision: str = "fp32"  # bf16: the model under bf16 autocast (runs on CUDA with train.precision bf16)
    nag_scale: float = 0.0  # Noise Awareness Guidance (0: none)
    sampler: str = "ddim"  # or ddpm (the learned variance when the model has one)

    def tag(self) -> str:
        """A short folder name for these settings."""
        parts = [
            ckpt.step_dir_name(self.step), f"n{self.num}", f"{self.sampler}{self.num_steps}",
            f"cfg{self.cfg_scale:g}", f"eta{self.eta:g}", f"seed{self.seed}",
        ]
        if self.nag_scale:
            parts.append(f"nag{self.nag_scale:g}")
        if not self.use_ema:
            parts.append("noema")
        if self.class_label is not None:
            parts.append(f"class{self.class_label}")
        return "-".join(parts)

    def identity(self) -> dict[str, Any]:
        """The settings that decide the images (not where or how fast they are drawn)."""
        data = asdict(self)
        for key in _PLACEMENT:
            data.pop(key)
        return data

    def labels(self, start: int, stop: int) -> torch.Tensor | None:
        """Class labels of samples ``start..stop-1``: ``i % num_classes`` or the fixed class."""
        if self.num_classes == 0:
            return None
        if self.class_label is not None:
            return torch.full((stop - start,), self.class_label, dtype=torch.long)
        return torch.arange(start, stop, dtype=torch.long) % self.num_classes

    def shards(self) -> list[tuple[int, int]]:
        bs = self.batch_size
        return [(s, min(s + bs, self.num)) for s in range(0, self.num, bs)]

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SampleSettings:
        return cls(**data)


def sample_settings(
    run: RunContext,
    num: int | None = None,
    cfg_scale: float | None = None,
    nag_scale: float | None = None,
    steps: int | None = None,
    eta: float | None = None,
    seed: int | None = None,
    use_ema: bool = True,
    class_label: int | None = None,
    batch_size: int | None = None,
    device: str | None = None,
    sampler: str | None = None,
) -> SampleSettings:
    """Settings from the options given, the rest from the run's recipe (``sample`` and
    ``eval.num_samples``); checked here so that mistakes fail before any work."""
    r = run.recipe
    settings = SampleSettings(
        checkpoint=str(run.checkpoint.resolve()),
        step=run.step,
        backbone=run.meta.backbone.model_dump(mode="json"),  # type: ignore[union-attr]
        diffusion=dict(run.meta.diffusion or {}),
        encoder=r.data.encoder.model_dump(mode="json"),
        latent_shape=list(run.latent_shape),
        num_classes=run.num_classes,
        num=r.eval.num_samples if num is None else int(num),
        num_steps=r.sample.num_steps if steps is None else int(steps),
        cfg_scale=r.sample.cfg_scale if cfg_scale is None else float(cfg_scale),
        eta=r.sample.eta if eta is None else float(eta),
        seed=(r.seed if run.meta.seed is None else run.meta.seed) if seed is None else int(seed),
        use_ema=bool(use_ema),
        class_label=class_label,
        batch_size=r.sample.batch_size if batch_size is None else int(batch_size),
        device=device or r.train.device,
        threads=r.train.threads,
        precision=r.train.precision if uses_cuda(device or r.train.device) else "fp32",
        nag_scale=r.sample.nag_scale if nag_scale is None else float(nag_scale),
        sampler=r.sample.sampler if sampler is None else str(sampler),
        weights_fingerprint=_fingerprint(weights_file(run.checkpoint, use_ema)),
    )
    if settings.sampler not in ("ddim", "ddpm"):
        raise ConfigError(f"--sampler: expected ddim or ddpm, got {settings.sampler!r}")
    if settings.num < 1:
        raise ConfigError(f"--num: expected a positive number of samples, got {settings.num}")
    if settings.num_steps < 1:
        raise ConfigError(f"--steps: expected a positive number of DDIM steps, got {settings.num_steps}")
    if settings.batch_size < 1:
        raise ConfigError(f"--batch-size: expected a positive integer, got {settings.batch_size}")
    if settings.eta < 0:
        raise ConfigError(f"--eta: expected a value >= 0, got {settings.eta:g}")
    if settings.cfg_scale < 0:
        raise ConfigError(f"--cfg-scale: expected a value >= 0, got {settings.cfg_scale:g}")
    if settings.nag_scale < 0:
        raise ConfigError(f"--nag-scale: expected a value >= 0, got {settings.nag_scale:g}")
    if settings.device not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"--device: expected auto, cpu or cuda, got {settings.device!r}")
    if settings.num_classes == 0 and settings.cfg_scale != 1.0:
        if cfg_scale is not None:
            raise ConfigError(
                f"--cfg-scale {cfg_scale:g}: the model in '{run.checkpoint}' is unconditional "
                "(no guidance); leave --cfg-scale out"
            )
        settings.cfg_scale = 1.0  # the recipe's scale means nothing without labels
    if class_label is not None:
        if settings.num_classes == 0:
            raise ConfigError(f"--class {class_label}: the model in '{run.checkpoint}' is unconditional")
        if not 0 <= class_label < settings.num_classes:
            raise ConfigError(
                f"--class {class_label}: expected a class in 0..{settings.num_classes - 1}"
            )
    return settings


def _fingerprint(path: Path, edge: int = 1 << 20) -> str:
    """sha256 of a file's size and its first and last MiB (cheap for any size)."""
    import hashlib

    if not path.is_file():
        return ""  # reported as missing when the weights are loaded
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(edge))
        fh.seek(max(size - edge, 0))
        digest.update(fh.read(edge))
    return digest.hexdigest()[:16]


def default_out_dir(run: RunContext, settings: SampleSettings) -> Path:
    """``<run>/samples/step_XXXXXXX-n<N>-ddim<D>-cfg<S>-eta<E>-seed<SEED>[-noema][-class<C>]``."""
    return run.run_dir / "samples" / settings.tag()


def prepare_out_dir(out: Path, settings: SampleSettings, batch_size_given: bool = True) -> SampleSettings:
    """Write ``settings.json`` into ``out`` (or check the one there) and return the settings
    to use. A folder sampled with other settings is refused; when ``--batch-size`` was not
    given, the batch size of an unfinished folder is adopted (it decides the shards)."""
    path = out / SETTINGS_FILE
    if path.is_file():
        try:
            old = SampleSettings.from_json(json.loads(path.read_text()))
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
            raise DataError(f"'{path}' is corrupt ({exc}); remove the folder '{out}'") from None
        if not batch_size_given and old.batch_size != settings.batch_size:
            settings = SampleSettings(**{**asdict(settings), "batch_size": old.batch_size})
        new_id, old_id = settings.identity(), old.identity()
        changed = sorted(k for k in new_id if new_id[k] != old_id.get(k))
        if changed:
            key = changed[0]
            hint = f"pass --batch-size {old.batch_size}, " if key == "batch_size" else ""
            raise ConfigError(
                f"'{out}' holds samples drawn with {key}={old_id.get(key)!r}, not "
                f"{new_id[key]!r}; {hint}choose another --out or remove that folder"
            )
    ckpt.atomic_write_text(path, json.dumps(asdict(settings), indent=2, sort_keys=True))
    return settings


def read_settings(out: Path) -> SampleSettings:
    path = Path(out) / SETTINGS_FILE
    try:
        return SampleSettings.from_json(json.loads(path.read_text()))
    except FileNotFoundError:
        raise DataError(f"'{path}' is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as exc:
        raise DataError(f"'{path}' is corrupt ({exc})") from None


# -------------------------------------------------------------------------- sampling
class Sampler:
    """The model (EMA or raw weights), schedule and decoder of one checkpoint."""

    def __init__(self, settings: SampleSettings, device: torch.device) -> None:
        from noisevalue.diffusion import Diffusion

        self.settings, self.device = settings, device
        self.model = load_model(settings).to(device).eval()
        self.diffusion = Diffusion.from_config(DiffusionConfig(**settings.diffusion))
        self.encoder = registry.build("encoder", Component(**settings.encoder), where="data.encoder")
        self.encoder.to(device)

    def images(self, start: int, stop: int) -> np.ndarray:
        """Samples ``start..stop-1`` as uint8 ``[n, H, W, C]`` (one model batch)."""
        from noisevalue.train.evaluate import Sampling, draw_images

        s = self.settings
        sampling = Sampling(s.num_steps, s.eta, s.cfg_scale, s.precision, s.nag_scale, s.sampler)
        unit = draw_images(self.model, self.diffusion, self.encoder, tuple(s.latent_shape), s.num_classes,
                           s.labels(start, stop), image_generators(s.seed, start, stop), sampling, self.device)
        return to_uint8_nhwc(unit)


def load_model(settings: SampleSettings) -> Any:
    """The checkpoint's backbone with the chosen weights (EMA or raw), refused when they are
    missing or non-finite, or when the guidance settings need what the model was not
    trained with."""
    from noisevalue.train.build import checkpoint_backbone

    path = Path(settings.checkpoint)
    name = "ema" if settings.use_ema else "model"
    weights = read_foreign(path)
    if weights is not None:  # one set of weights: the file's
        identity = ckpt.Identity(**settings.backbone)
        model = registry.build("backbone", registry.Named(identity.name, identity.params), where="model")
        ckpt.load_state_into(model, weights.state, f"'{path}'")
    elif not (path / f"{name}.safetensors").is_file():
        hint = "; pass --no-ema to use the raw weights" if settings.use_ema else ""
        raise CheckpointError(f"checkpoint '{path}': {name}.safetensors is missing{hint}")
    else:
        model = checkpoint_backbone(path, ckpt.Identity(**settings.backbone), name, "model", f"{path} ({name})")
    bad = next((k for k, v in model.state_dict().items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad is not None:
        raise CheckpointError(f"checkpoint '{path}': {name}.safetensors holds non-finite values ('{bad}'); "
                              "the run diverged: sample an earlier checkpoint")
    dropout = float(model.class_dropout_prob)
    if settings.num_classes and settings.cfg_scale != 1.0 and dropout <= 0:
        raise ConfigError(
            f"--cfg-scale {settings.cfg_scale:g}: guidance needs a model trained with label "
            "dropout (class_dropout_prob > 0); use --cfg-scale 1"
        )
    if settings.nag_scale and float(model.time_dropout_prob) <= 0:
        raise ConfigError(
            f"--nag-scale {settings.nag_scale:g}: Noise Awareness Guidance needs a model trained with a "
            "null time (time_dropout_prob > 0, e.g. a NAG-DiT backbone); use --nag-scale 0"
        )
    return model


def check_sampling(settings: SampleSettings, out: Path, per_node: int = 1) -> None:
    """What sampling into ``out`` needs, checked before ``out`` is created: a writable
    folder, the device, whole and finite weights that suit the settings, and the decoder."""
    from noisevalue.train.preflight import check_device, check_output

    check_output(out, "--out")
    check_device(settings.device, per_node, "--device")
    load_model(settings)
    registry.build("encoder", Component(**settings.encoder), where="data.encoder")


def to_uint8_nhwc(unit: torch.Tensor) -> np.ndarray:
    """Float images in [0, 1] ``[n, C, H, W]`` -> uint8 ``[n, H, W, C]`` (rounded, as PNG)."""
    from noisevalue.train.evaluate import to_uint8

    return to_uint8(unit).permute(0, 2, 3, 1).contiguous().cpu().numpy()


def _shard_path(out: Path, start: int, stop: int) -> Path:
    return out / SHARDS_DIR / f"{start:09d}-{stop:09d}.npy"


def _save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with ckpt.atomic_file(path) as tmp, open(tmp, "wb") as fh:
        np.save(fh, array)


def run_sampling(out: Path, info: DistInfo, say: Any = print) -> Path:
    """Draw this rank's missing shards of the samples in ``out`` (``settings.json``), then
    on rank 0 assemble ``samples.npz`` and ``grid.png``. Returns the npz path."""
    from noisevalue.train.progress import StepProgress

    out = Path(out)
    settings = read_settings(out)
    final = out / SAMPLES_FILE
    if final.is_file():
        return final
    if settings.threads and info.device.type == "cpu":
        torch.set_num_threads(settings.threads)
    shards = settings.shards()
    missing = [s for s in shards if not _shard_path(out, *s).is_file()]
    barrier(info)  # every rank lists the same missing shards before any is written
    mine = missing[info.rank :: info.world_size]
    if info.is_main:
        done = len(shards) - len(missing)
        say(f"sampling {settings.num} images in {len(shards)} shards of {settings.batch_size} "
            f"({done} done already) with {info.world_size} process(es) on {info.device}")
    if mine:
        sampler = Sampler(settings, info.device)
        with StepProgress("sample", len(mine), enabled=info.is_main,
                          print_every=max(1, len(mine) // 10)) as bar:
            for start, stop in mine:
                _save_npy_atomic(_shard_path(out, start, stop), sampler.images(start, stop))
                bar.advance()
    barrier(info)
    if info.is_main:
        _assemble(out, settings)
    barrier(info)
    return final


def _assemble(out: Path, settings: SampleSettings) -> None:
    shards = settings.shards()
    paths = [_shard_path(out, *s) for s in shards]
    absent = [p for p in paths if not p.is_file()]
    if absent:
        raise DataError(f"'{absent[0]}' is missing ({len(absent)} shards): run the same `noisevalue sample` again")
    first = np.load(paths[0], mmap_mode="r")
    shape = (settings.num, *first.shape[1:])
    labels = settings.labels(0, settings.num)
    write_images_npz(
        out / SAMPLES_FILE, shape, (np.load(p) for p in paths),
        labels.numpy() if labels is not None else None,
    )
    _write_grid(out / GRID_FILE, paths, settings)
    shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)


def _write_grid(path: Path, shard_paths: list[Path], settings: SampleSettings) -> None:
    """The first images, as training draws its grids: one row per class (up to 16 classes;
    sample i has class i % classes), or 8 rows of 8."""
    from noisevalue.train.evaluate import save_png_atomic

    k = settings.num_classes
    by_class = 2 <= k <= 16 and settings.class_label is None and settings.num >= k
    per = min(8, settings.num // k) if by_class else 8
    count = k * per if by_class else min(settings.num, 64)
    parts, have = [], 0
    for p in shard_paths:
        if have >= count:
            break
        chunk = np.load(p)[: count - have]
        parts.append(chunk)
        have += len(chunk)
    images = torch.from_numpy(np.concatenate(parts)).permute(0, 3, 1, 2).float() / 255
    if by_class:  # class-major: row c holds samples c, c + k, c + 2k, ...
        images = images[torch.tensor([j * k + c for c in range(k) for j in range(per)])]
    save_png_atomic(images, path, per)


def write_images_npz(
    path: Path, shape: tuple[int, ...], chunks: Iterator[np.ndarray] | Any, labels: np.ndarray | None = None
) -> None:
    """Stream uint8 image chunks into ``path`` as ``arr_0`` of ``shape`` (and ``arr_1`` =
    ``labels``), in the ADM evaluation-suite format readable by ``np.load``; atomic."""
    with ckpt.atomic_file(path) as tmp:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as fh:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)),
                          "fortran_order": False, "shape": tuple(int(s) for s in shape)}
                np.lib.format.write_array_header_1_0(fh, header)
                written = 0
                for chunk in chunks:
                    chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
                    if chunk.shape[1:] != tuple(shape[1:]):
                        raise ValueError(f"chunk of shape {chunk.shape} in an array of shape {shape}")
                    fh.write(chunk.tobytes())
                    written += len(chunk)
                if written != shape[0]:
                    raise ValueError(f"wrote {written} images, expected {shape[0]}")
            if labels is not None:
                with zf.open("arr_1.npy", "w", force_zip64=True) as fh:
                    np.lib.format.write_array(fh, np.asarray(labels, dtype=np.int64))
