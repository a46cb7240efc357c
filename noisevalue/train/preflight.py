"""Everything a run needs, checked before anything is created.

A command calls :func:`check_run` after the recipe parsed and before it writes its first
file, so that a mistake found at minute zero costs nothing on disk: the output folder can be
written, the device exists, the batch divides over the processes, the data opens (a bounded
sample of its items is read), weights files load, the networks build with the data's shapes,
and every checkpoint the recipe names exists, is of the right kind and is not truncated.
Each problem is one :class:`~noisevalue.errors.UserError` line naming the recipe key, file
or option.

What the run itself would find later (an unreadable image outside the sample) still stops it
with one line; this is a net for the common mistakes, cheap next to the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from noisevalue import checkpoint as ckpt
from noisevalue import registry
from noisevalue.backbones.dit_formats import ForeignWeights, numerics_problem, read_foreign
from noisevalue.config import Recipe
from noisevalue.distributed import pick_device
from noisevalue.errors import CheckpointError, ConfigError, DataError, UserError
from noisevalue.train.batches import local_batch_size, validation_split
from noisevalue.train.build import backbone_params, build_backbone, build_evaluators

#: items of each dataset opened before a run (the first, the last and a seeded sample)
SAMPLED_ITEMS = 16

META_WORKFLOWS = ("meta_train", "protocol")  # workflows that meta-train a rater


def check_run(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, processes: int = 1,
              per_node: int = 1) -> None:
    """Check that ``recipe`` can run into ``run_dir`` on ``processes`` processes
    (``per_node`` of them on this machine), continuing its newest checkpoint when ``resume``.
    Raises a UserError naming every problem :func:`check_recipe` finds (else the first
    other one); creates nothing."""
    check_output(run_dir, "output_dir", resume=resume)
    shape, num_classes = check_recipe(recipe, processes=processes, per_node=per_node)
    if resume and recipe.workflow != "protocol":
        latest, meta = check_resumable(Path(run_dir) / "checkpoints")
        if recipe.workflow == "pretrain":
            require_backbone(latest, meta, _identity(recipe, shape, num_classes))
        if recipe.workflow == "meta_train":
            from noisevalue.train.meta_training import same_subproblems, subproblems

            same_subproblems(meta, subproblems(recipe, processes))


class Problems:
    """Runs checks, keeping every problem they find, to report all of them in one line."""

    def __init__(self) -> None:
        self.found: list[UserError] = []

    def attempt(self, check: Any, *args: Any) -> Any:
        """``check(*args)``, or None after keeping the UserError it raised."""
        try:
            return check(*args)
        except UserError as exc:
            self.found.append(exc)
            return None

    def raise_found(self) -> None:
        """The one problem as it is, several as ``N problems: A; B; C``."""
        if len(self.found) == 1:
            raise self.found[0]
        if self.found:
            raise ConfigError(f"{len(self.found)} problems: " + "; ".join(str(p) for p in self.found))


def check_recipe(recipe: Recipe, *, processes: int = 1, per_node: int = 1) -> tuple[tuple[int, int, int], int]:
    """Everything of :func:`check_run` that does not depend on the output folder: device,
    batches, data, weights files, networks and the checkpoints the recipe names. Every
    problem found is reported at once, in one line (``N problems: A; B; C``), so that a
    new machine's missing data, VAE and Inception weights are supplied in one go. Returns
    (the diffusion model's input shape, classes)."""
    problems = Problems()
    attempt = problems.attempt
    attempt(check_device, recipe.train.device, per_node, "train.device")
    attempt(check_batches, recipe, processes)
    dataset = attempt(check_dataset, recipe.data.dataset, "data.dataset", recipe.seed)
    if recipe.data.eval_dataset is not None:
        attempt(check_dataset, recipe.data.eval_dataset, "data.eval_dataset", recipe.seed)
    encoder = attempt(lambda: registry.build("encoder", recipe.data.encoder, where="data.encoder"))
    attempt(build_evaluators, recipe)  # weights files load now, not after training
    shape: tuple[int, int, int] | None = None
    num_classes = 0
    if dataset is not None and encoder is not None:
        shape = tuple(encoder.latent_shape(dataset.channels, dataset.image_size))  # type: ignore[assignment]
        num_classes = int(dataset.num_classes)
        attempt(_check_networks, recipe, shape, num_classes, len(dataset))
    attempt(check_named_checkpoints, recipe, shape, num_classes)
    problems.raise_found()
    assert shape is not None
    return shape, num_classes


def check_cache(recipe: Recipe, cache_dir: str | Path, *, per_node: int = 1) -> tuple[str, int, int, int]:
    """Everything ``noisevalue cache`` needs to encode the recipe's training data into the
    latent cache ``cache_dir`` (``per_node`` processes on this machine): a cacheable encoder
    (else one line: nothing to cache), the device, the data (a sample of items opened), the
    encoder's weights, the cache folder writable and, if it holds a cache, one of the same
    content. Every problem in one line, as :func:`check_recipe`. Creates nothing. Returns
    (state, shards present, shards, items): state ``complete``, ``partial`` or ``absent``."""
    from noisevalue.data.latent_cache import inspect_latent_cache
    from noisevalue.train.data import cache_arguments

    where = "data.latent_cache" if recipe.data.latent_cache else "output_dir"
    problems = Problems()
    attempt = problems.attempt
    encoder = attempt(lambda: registry.build("encoder", recipe.data.encoder, where="data.encoder"))
    if encoder is not None and not encoder.cacheable:
        raise ConfigError(
            f"data.encoder: '{recipe.data.encoder.name}' is not cached (its latents cost nothing to compute); "
            "there is nothing to cache: 'noisevalue run' reads this recipe's data directly"
        )
    attempt(check_device, recipe.train.device, per_node, "train.device")
    attempt(check_output, cache_dir, where)
    dataset = attempt(check_dataset, recipe.data.dataset, "data.dataset", recipe.seed)

    def shape() -> Any:
        try:
            return encoder.latent_shape(dataset.channels, dataset.image_size)
        except DataError as exc:
            raise DataError(f"data.encoder: {exc}") from None

    found = None
    if dataset is not None and encoder is not None and attempt(shape) is not None:
        found = attempt(lambda: inspect_latent_cache(dataset, encoder, cache_dir, **cache_arguments(recipe)))
    problems.raise_found()
    assert found is not None
    return (*found, len(dataset))


def _check_networks(recipe: Recipe, shape: tuple[int, int, int], num_classes: int, num_items: int) -> None:
    model = check_backbone(recipe, shape, num_classes)
    check_guidance(recipe, model, num_classes)
    if recipe.workflow in META_WORKFLOWS or _needs_validation(recipe):
        validation_split(num_items, recipe.meta.val_fraction, recipe.seed)
    if recipe.workflow in META_WORKFLOWS and recipe.rater is not None:
        params = registry.with_shapes("rater", recipe.rater, "rater", shape, num_classes)
        registry.build_on_meta("rater", registry.Named(recipe.rater.name, params), where="rater")


def check_output(folder: str | Path, what: str, resume: bool = False) -> None:
    """``folder`` is a folder, or can be made one, and can be written (``what`` names it)."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"{what}: '{folder}' is a file, not a folder")
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if existing.exists() and not existing.is_dir():
        raise ConfigError(f"{what}: '{folder}' cannot be created: '{existing}' is a file")
    targets = [existing] + ([folder / "checkpoints"] if resume and (folder / "checkpoints").is_dir() else [])
    for target in targets:
        if not os.access(target, os.W_OK | os.X_OK):
            raise ConfigError(f"{what}: '{target}' is not writable")


def check_device(preference: str, per_node: int, what: str) -> None:
    """The device a run asks for exists, with a GPU for each process on this machine."""
    if pick_device(preference, what=what).type == "cuda" and per_node > torch.cuda.device_count():
        raise ConfigError(
            f"--nproc-per-node {per_node}: this machine has {torch.cuda.device_count()} GPU(s); "
            "start at most one process per GPU"
        )


def check_batches(recipe: Recipe, processes: int) -> None:
    """Every global batch of the workflow divides over ``processes``."""
    local_batch_size(recipe.train.global_batch_size, processes)
    if recipe.workflow in META_WORKFLOWS:
        from noisevalue.train.meta_training import local_subproblems, per_subproblem, subproblems

        m, n = recipe.meta, subproblems(recipe, processes)
        local_subproblems(n, processes)
        per_subproblem(m.groups, n, "meta.groups")
        per_subproblem(m.val_batch_size, n, "meta.val_batch_size")
        if m.probe_groups:
            per_subproblem(m.probe_groups, n, "meta.probe_groups")


def check_dataset(component: Any, where: str, seed: int) -> Any:
    """Build a dataset and read a sample of its items; returns it."""
    dataset = registry.build("dataset", component, where=where)
    if len(dataset) == 0:
        raise DataError(f"{where}: the dataset is empty")
    read_sample(dataset, where, seed)
    return dataset


def read_sample(dataset: Any, where: str, seed: int) -> None:
    """Open up to :data:`SAMPLED_ITEMS` items of an on-disk dataset: the first, the last and a
    seeded random choice (in-memory datasets are whole already)."""
    if hasattr(dataset, "images"):
        return
    n = len(dataset)
    g = torch.Generator().manual_seed(seed)
    chosen = {0, n - 1, *torch.randperm(n, generator=g)[: SAMPLED_ITEMS - 2].tolist()}
    for i in sorted(chosen):
        try:
            image, _ = dataset[i]
        except UserError:
            raise
        except Exception as exc:  # noqa: BLE001 - a reader's own error, reported as the data's
            raise DataError(f"{where}: item {i} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
        if not torch.isfinite(image).all():
            raise DataError(f"{where}: item {i} holds non-finite values")


def check_backbone(recipe: Recipe, shape: tuple[int, int, int], num_classes: int) -> Any:
    """The backbone with the data's shapes, built on the meta device (no memory used); the
    hybrid loss needs one that learns its variance."""
    params = backbone_params(recipe, shape, num_classes)
    model = registry.build_on_meta("backbone", registry.Named(recipe.model.name, params), where="model")
    if recipe.train.loss == "hybrid" and not getattr(model, "learn_sigma", False):
        raise ConfigError("train.loss: hybrid trains the learned variance, and the backbone has none; "
                          "set model.params.learn_sigma=true (or train.loss=simple)")
    return model


def check_guidance(recipe: Recipe, model: Any, num_classes: int) -> None:
    """Classifier-free guidance needs a model trained with a null label."""
    drop = float(getattr(model, "class_dropout_prob", 0.0) or 0.0) if model is not None else None
    if num_classes and drop == 0 and recipe.sample.cfg_scale != 1.0:
        raise ConfigError(
            f"sample.cfg_scale: guidance ({recipe.sample.cfg_scale}) needs a null label; set "
            "model.params.class_dropout_prob > 0 or sample.cfg_scale=1"
        )


def check_named_checkpoints(recipe: Recipe, shape: tuple[int, int, int] | None, num_classes: int) -> None:
    """Checkpoints the recipe names (not those its own stages will write) exist, are of the
    right kind and match the data (when its ``shape`` is known)."""
    weights = read_foreign(recipe.train.init_from) if recipe.train.init_from else None
    if weights is not None:
        check_foreign_weights(recipe, weights, shape, num_classes)
    elif recipe.train.init_from and recipe.workflow != "meta_train":
        found, meta = check_diffusion_checkpoint(recipe.train.init_from, "train.init_from", shape, num_classes)
        if recipe.workflow == "pretrain" and shape is not None:
            require_backbone(found, meta, _identity(recipe, shape, num_classes))
    if recipe.workflow == "meta_train":
        if not recipe.meta.pretrained:
            raise ConfigError("meta.pretrained: a diffusion checkpoint (run or step folder) is required")
        check_diffusion_checkpoint(recipe.meta.pretrained, "meta.pretrained", shape, num_classes)
    if recipe.train.selector.params.get("checkpoint"):
        registry.build("selector", recipe.train.selector, where="train.selector")  # loads the rater


def check_diffusion_checkpoint(path: str | Path, where: str, shape: tuple[int, int, int] | None = None,
                               num_classes: int | None = None) -> tuple[Path, ckpt.CheckpointMeta]:
    """A diffusion checkpoint named by ``where``: found, of that kind, matching the data's
    shapes when given, and with whole weight files. Returns its folder and ``meta.json``."""
    try:
        found = ckpt.resolve_checkpoint(path)
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from None
    meta = ckpt.require_diffusion(found, where)
    if shape is not None and (meta.latent_shape != tuple(shape) or meta.num_classes != num_classes):
        raise CheckpointError(
            f"{where}: '{found}' was trained on latents {meta.latent_shape} with {meta.num_classes} classes, "
            f"but the data gives {tuple(shape)} with {num_classes}"
        )
    ckpt.check_files(found)
    return found, meta


def check_foreign_weights(recipe: Recipe, weights: ForeignWeights, shape: tuple[int, int, int] | None,
                          num_classes: int) -> None:
    """``train.init_from`` names weights from outside noisevalue (an official DiT file or a
    diffusers folder): the recipe's backbone, built without memory, takes them as they are
    (names, shapes, numerics); one line naming what does not fit otherwise."""
    where = f"train.init_from '{recipe.train.init_from}'"
    if recipe.workflow == "meta_train":
        raise ConfigError(f"{where}: meta-training starts from meta.pretrained, a noisevalue diffusion checkpoint")
    if shape is None:
        return
    with torch.device("meta"):
        model = build_backbone(recipe, backbone_params(recipe, shape, num_classes))
    problem = numerics_problem(model, weights)
    if problem is not None:
        raise ConfigError(f"{where}: {problem}")
    ckpt.check_state(model.state_dict(), weights.state, where)


def check_resumable(checkpoints: Path) -> tuple[Path, ckpt.CheckpointMeta]:
    """The checkpoint ``--resume`` continues from is whole; returns it and its ``meta.json``."""
    latest = ckpt.latest_checkpoint(checkpoints)
    if latest is None:
        raise CheckpointError(f"--resume: no checkpoint in '{checkpoints}'")
    meta = ckpt.read_meta(latest)
    ckpt.check_files(latest)
    return latest, meta


def require_backbone(path: Path, meta: ckpt.CheckpointMeta, identity: ckpt.Identity) -> None:
    """A diffusion checkpoint (``path``, its ``meta``) that a run loads into its own backbone
    was written for it."""
    if meta.backbone != identity:
        raise CheckpointError(
            f"checkpoint '{path}' was written for backbone {meta.backbone}, but the recipe builds {identity}"
        )


def _identity(recipe: Recipe, shape: tuple[int, int, int], num_classes: int) -> ckpt.Identity:
    return ckpt.Identity(name=recipe.model.name, params=backbone_params(recipe, shape, num_classes))


def _needs_validation(recipe: Recipe) -> bool:
    """A training selector that draws held-out batches (the oracle) needs a validation split."""
    try:
        factory = registry.get("selector", recipe.train.selector.name)
    except UserError:
        return False
    return bool(getattr(factory, "needs_training_context", False))
