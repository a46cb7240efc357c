"""``noisevalue export``: a run's model in the layouts the rest of the field reads.

* ``diffusers``: a ``DiTPipeline`` folder (``transformer/``, ``vae/``, ``scheduler/``,
  ``model_index.json``) that ``DiTPipeline.from_pretrained(OUT)`` loads offline. The
  scheduler is the run's sampler (DDIM on the run's schedule, trailing spacing, no
  clipping), the VAE is the run's own with its latent scale as ``scaling_factor``. A DiT with
  the reference timestep features (every recipe's default) is written as
  ``noisevalue.backbones.diffusers_dit.ReferenceDiTTransformer2DModel``, which diffusers
  imports when loading (noisevalue must be installed); one trained with
  ``model.params.time_freq_shift=1`` as diffusers' own ``DiTTransformer2DModel``.
* ``dit``: the weights as a plain state dict in the official layout, for the official
  code's ``sample.py`` (``--ckpt``).

What the pipeline cannot reproduce is refused in one line, before anything is written:
pixel-space runs (``DiTPipeline`` always decodes with a VAE) and unconditional ones (its
DiT always embeds a class). Its guidance uses label 1000 as the null class, so guidance
through it matches ``noisevalue sample`` for 1000-class models; without guidance
(``guidance_scale=1``) it matches for any class count. ``DiTPipeline`` takes DDIM steps
with eta 0.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from noisevalue import checkpoint as ckpt
from noisevalue.backbones.dit import DiT
from noisevalue.backbones.dit_formats import DIFFUSERS_CLASS, to_diffusers
from noisevalue.config import Recipe
from noisevalue.errors import ConfigError
from noisevalue.sampling.sample import SampleSettings, load_model

FORMATS = ("diffusers", "dit")
_PIXELS = ("--format diffusers: the run's data.encoder '{name}' is not a VAE (an AutoencoderKL with a scale), "
           "and DiTPipeline decodes latents with one; use --format dit for the weights")


def check_export(settings: SampleSettings, out: Path, fmt: str) -> None:
    """What an export needs, checked before the model is loaded or anything written."""
    if fmt not in FORMATS:
        raise ConfigError(f"--format: expected one of {', '.join(FORMATS)}, got {fmt!r}")
    if out.exists():
        raise ConfigError(f"'{out}' exists already; choose another output path or remove it")
    if fmt == "diffusers":
        if settings.encoder.get("name") == "identity":
            raise ConfigError(_PIXELS.format(name="identity"))
        if settings.num_classes == 0:
            raise ConfigError("--format diffusers: the run is unconditional, and diffusers' DiT always embeds "
                              "a class label; use --format dit for the weights")


def export(settings: SampleSettings, out: Path, fmt: str, recipe: Recipe | None = None) -> str:
    """Write the export to ``out`` (atomically: a temporary path, then renamed); returns a
    line saying how to load it. ``recipe``: the run's, whose dataset's class names become
    the pipeline's ``id2label`` (so ``pipe.get_label_ids(["..."])`` works)."""
    check_export(settings, out, fmt)
    model = load_model(settings).eval()
    if not isinstance(model, DiT):
        raise ConfigError(f"export: only a DiT backbone exports, not '{settings.backbone.get('name')}'")
    if fmt == "dit":
        return _export_dit(model, out)
    names = dataset_class_names(recipe) if recipe is not None and settings.num_classes else None
    return _export_diffusers(model, settings, out, names)


def dataset_class_names(recipe: Recipe) -> list[str] | None:
    """The training dataset's class names by label, when it has them and can be read here."""
    from noisevalue import registry
    from noisevalue.errors import UserError

    try:
        dataset = registry.build("dataset", recipe.data.dataset, where="data.dataset")
    except UserError:
        return None
    names = getattr(dataset, "classes", None)
    return [str(n) for n in names] if names else None


def _export_dit(model: DiT, out: Path) -> str:
    name = model.config_name
    if model.t_embedder.freq_shift != 0 or any(b.norm2.eps != 1e-6 for b in model.blocks):  # type: ignore[union-attr]
        raise ConfigError(f"--format dit: {name} was trained with diffusers' numerics (time_freq_shift or "
                          "mlp_norm_eps), which the official code does not compute; use --format diffusers")
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with ckpt.atomic_file(out, suffix=".pt") as tmp:
        torch.save(state, tmp)
    sigma = "" if model.learn_sigma else " (built with learn_sigma=False: the official models learn sigma)"
    return (f"{out}: {name} in the official layout{sigma}; load it with torch.load(path, weights_only=True) "
            "and load_state_dict(strict=True), or pass it to the official sample.py as --ckpt")


def _export_diffusers(model: DiT, settings: SampleSettings, out: Path, class_names: list[str] | None) -> str:
    from diffusers import DiTPipeline, DiTTransformer2DModel

    from noisevalue import registry
    from noisevalue.backbones.diffusers_dit import ReferenceDiTTransformer2DModel
    from noisevalue.config import Component, DiffusionConfig
    from noisevalue.diffusion import Diffusion, ddim_scheduler

    config, state = to_diffusers(model)
    cls: Any = DiTTransformer2DModel if config["_class_name"] == DIFFUSERS_CLASS else ReferenceDiTTransformer2DModel
    transformer = cls(**{k: v for k, v in config.items() if not k.startswith("_")})
    transformer.load_state_dict(state, strict=True)
    encoder = registry.build("encoder", Component(**settings.encoder), where="data.encoder")
    vae = getattr(encoder, "vae", None)
    if getattr(encoder, "pixel_space", False) or vae is None or not hasattr(encoder, "scale_factor"):
        raise ConfigError(_PIXELS.format(name=settings.encoder.get("name")))
    vae.register_to_config(scaling_factor=float(encoder.scale_factor))
    diffusion = Diffusion.from_config(DiffusionConfig(**settings.diffusion))
    scheduler = ddim_scheduler(diffusion)
    pipe: Any = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if class_names and len(class_names) == settings.num_classes:
            index = tmp / "model_index.json"  # DiTPipeline takes id2label from it when loading
            data = json.loads(index.read_text())
            index.write_text(json.dumps({**data, "id2label": dict(enumerate(class_names))}, indent=2, sort_keys=True))
        (tmp / "noisevalue_export.json").write_text(json.dumps({
            "checkpoint": settings.checkpoint, "step": settings.step,
            "weights": "ema" if settings.use_ema else "model", "backbone": settings.backbone,
            "transformer_class": config["_class_name"], "sampler": {"name": "ddim", "eta": 0.0, **{k: scheduler.config[k] for k in (
                "clip_sample", "set_alpha_to_one", "timestep_spacing")}},
            "recipe_sampling": {"num_steps": settings.num_steps, "cfg_scale": settings.cfg_scale,
                                "eta": settings.eta},
        }, indent=2, sort_keys=True))
        ckpt.publish(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    guidance = settings.cfg_scale if settings.num_classes == 1000 else 1.0
    if settings.sampler != "ddim":  # DiTPipeline hands its scheduler the epsilon channels only
        return (f"{out}: DiTPipeline.from_pretrained('{out}') samples with DDIM; the run samples with "
                f"{settings.sampler.upper()} and the learned variance, which DiTPipeline does not pass to its scheduler")
    return (f"{out}: DiTPipeline.from_pretrained('{out}')(class_labels=[...], num_inference_steps="
            f"{settings.num_steps}, guidance_scale={guidance:g}) draws what noisevalue sample draws with eta 0")
