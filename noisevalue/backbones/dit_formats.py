"""DiT weights in the two layouts people have: the official code's ``.pt`` state dicts and
diffusers' ``DiTTransformer2DModel`` folders.

Our :class:`~noisevalue.backbones.dit.DiT` uses the official parameter names, so an official
file loads as it is, once read safely (``torch.load(weights_only=True)``: a file that would
unpickle Python objects is refused). diffusers' layout differs in names and in three more
ways, all handled here:

* the attention's ``qkv`` projection is three (``to_q``, ``to_k``, ``to_v``);
* the timestep and class embedders are copied into every block (``norm1.emb``); we keep
  one, so a folder whose copies differ is refused;
* its numerics: timestep frequencies ``10000 ** (-i / (half - 1))`` where the official
  code divides by ``half``, and the MLP LayerNorm's eps from ``norm_eps`` (1e-5 by default,
  1e-6 in the official code). A folder converts to a DiT built with ``time_freq_shift=1``
  and ``mlp_norm_eps=norm_eps``, which computes what diffusers computes. A DiT with the
  reference numerics is written as :mod:`noisevalue.backbones.diffusers_dit`'s subclass,
  which computes those; one built with ``time_freq_shift=1`` as the plain class.
"""

from __future__ import annotations

import json
import math
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from noisevalue.backbones.dit import DiT, get_2d_sincos_pos_embed
from noisevalue.errors import CheckpointError

__all__ = [
    "DIFFUSERS_CLASS", "ForeignWeights", "diffusers_folder", "from_diffusers", "is_foreign", "numerics_problem", "read_diffusers",
    "read_foreign", "read_official", "shape_params", "to_diffusers",
]

DIFFUSERS_CLASS = "DiTTransformer2DModel"
REFERENCE_CLASS = "ReferenceDiTTransformer2DModel"  # noisevalue.backbones.diffusers_dit
CONFIG = "config.json"
WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
# diffusers settings our DiT has no counterpart for: (config key, the only value it can take)
_FIXED = (("norm_type", "ada_norm_zero"), ("activation_fn", "gelu-approximate"),
          ("norm_elementwise_affine", False), ("attention_bias", True), ("upcast_attention", False))
_EMBEDDERS = {  # ours -> diffusers' (in block 0; every block holds a copy)
    "t_embedder.mlp.0": "norm1.emb.timestep_embedder.linear_1",
    "t_embedder.mlp.2": "norm1.emb.timestep_embedder.linear_2",
}
_BLOCK = {  # ours (blocks.i.) -> diffusers' (transformer_blocks.i.)
    "adaLN_modulation.1": "norm1.linear",
    "attn.proj": "attn1.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
}
_TOP = {"x_embedder.proj": "pos_embed.proj", "final_layer.adaLN_modulation.1": "proj_out_1",
        "final_layer.linear": "proj_out_2"}


@dataclass(frozen=True)
class ForeignWeights:
    """Weights from outside noisevalue: an official DiT file (``layout="dit"``) or a
    diffusers folder (``"diffusers"``), as a state dict in our layout. ``numerics``: the DiT
    keywords they need to compute what they computed where they came from."""

    layout: str
    state: dict[str, torch.Tensor]
    numerics: dict[str, Any] = field(default_factory=dict)


def is_foreign(path: str | Path) -> bool:
    """Whether ``path`` names weights from outside noisevalue (a file, a diffusers DiT
    folder), found without reading them."""
    return Path(path).is_file() or diffusers_folder(path) is not None


def read_foreign(path: str | Path) -> ForeignWeights | None:
    """The weights at ``path`` when they are an official DiT file or a diffusers DiT folder;
    None when ``path`` is something else (a noisevalue run or checkpoint folder)."""
    path = Path(path)
    if path.is_file():
        return ForeignWeights("dit", read_official(path))
    if diffusers_folder(path) is not None:
        kwargs, state = read_diffusers(path)
        return ForeignWeights("diffusers", state, {k: kwargs[k] for k in ("time_freq_shift", "mlp_norm_eps")})
    return None


def shape_params(state: Mapping[str, torch.Tensor], null_label: bool, where: str) -> dict[str, Any]:
    """The data-shaped DiT keywords that a state dict (our layout) implies: ``input_size``,
    ``in_channels``, ``num_classes`` (the class table's rows, less the null label's when
    ``null_label``) and ``learn_sigma``."""
    patch_w = _take(state, "x_embedder.proj.weight", where)  # [hidden, C, p, p]
    channels, patch = int(patch_w.shape[1]), int(patch_w.shape[2])
    grid = math.isqrt(int(_take(state, "pos_embed", where).shape[1]))
    out = int(_take(state, "final_layer.linear.weight", where).shape[0]) // (patch * patch)
    table = state.get("y_embedder.embedding_table.weight")
    classes = 0 if table is None else int(table.shape[0]) - int(null_label)
    return {"input_size": grid * patch, "in_channels": channels, "num_classes": classes,
            "learn_sigma": out == 2 * channels}


def numerics_problem(model: torch.nn.Module, weights: ForeignWeights) -> str | None:
    """Why ``model`` would compute another function with ``weights`` than where they came
    from (its timestep frequencies or MLP norm eps differ), as the recipe settings that fix
    it; None when they agree."""
    if not weights.numerics:
        return None
    has = {"time_freq_shift": getattr(getattr(model, "t_embedder", None), "freq_shift", None),
           "mlp_norm_eps": _mlp_norm_eps(model) if isinstance(model, DiT) else None}
    wrong = {k: v for k, v in weights.numerics.items() if has.get(k) != v}
    if not wrong:
        return None
    fix = " ".join(f"model.params.{k}={v!r}" for k, v in weights.numerics.items())
    return (f"these {weights.layout} weights were trained with other timestep frequencies or MLP norm eps than "
            f"the recipe's DiT; set {fix} to compute what they computed")


def _mlp_norm_eps(model: DiT) -> float:
    return float(next(b.norm2.eps for b in model.blocks if isinstance(b.norm2, torch.nn.LayerNorm)))


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, nothing run."""
    if not zipfile.is_zipfile(path):  # what torch.save has written since torch 1.6
        raise CheckpointError(f"{what} '{path}' is not a readable torch file (torch.save's zip format)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        reason = f"a {found.group(1)}" if found else "an object that is not a tensor"
        raise CheckpointError(
            f"{what} '{path}' holds Python objects besides tensors ({reason}), which are not unpickled; "
            "save the state dict alone, e.g. torch.save(model.state_dict(), path)"
        ) from None
    except (OSError, RuntimeError, EOFError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"{what} '{path}' is not a readable torch file ({reason})") from None


def read_official(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of an official DiT ``.pt`` file: a state dict, or a dict holding one
    under ``ema`` (preferred, as the official sampler does) or ``model``."""
    path = Path(path)
    data = _torch_load(path, "DiT weights")
    if isinstance(data, Mapping) and not any(isinstance(v, torch.Tensor) for v in data.values()):
        data = next((data[k] for k in ("ema", "model") if isinstance(data.get(k), Mapping)), data)
    if not isinstance(data, Mapping) or not data or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in data.items()):
        raise CheckpointError(f"DiT weights '{path}': expected a state dict (parameter name -> tensor), "
                              "or a dict holding one under 'ema' or 'model'")
    return {k.removeprefix("module."): v for k, v in data.items()}


def diffusers_folder(path: str | Path) -> Path | None:
    """The ``DiTTransformer2DModel`` folder at ``path`` (the folder itself, or the
    ``transformer`` folder of a pipeline), or None when ``path`` is not one."""
    path = Path(path)
    for folder in (path, path / "transformer"):
        config = folder / CONFIG
        if config.is_file():
            try:
                name = json.loads(config.read_text()).get("_class_name")
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
                continue
            if name in (DIFFUSERS_CLASS, REFERENCE_CLASS):
                return folder
    return None


def read_diffusers(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The DiT keywords and state dict (our layout) of a ``DiTTransformer2DModel`` folder."""
    folder = diffusers_folder(path)
    if folder is None:
        raise CheckpointError(f"'{path}' is not a diffusers {DIFFUSERS_CLASS} folder "
                              f"(no {CONFIG} naming that class, here or in transformer/)")
    config = json.loads((folder / CONFIG).read_text())
    found = [folder / name for name in WEIGHTS if (folder / name).is_file()]
    if not found:
        raise CheckpointError(f"diffusers folder '{folder}': no weights ({' or '.join(WEIGHTS)})")
    if found[0].suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            state = load_file(str(found[0]))
        except Exception as exc:  # noqa: BLE001 - safetensors' own error type
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"diffusers weights '{found[0]}' are corrupt or truncated ({reason})") from None
    else:
        state = _torch_load(found[0], "diffusers weights")
    return from_diffusers(config, state, str(folder))


def _config_value(config: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in config:
        raise CheckpointError(f"{where}: {CONFIG} has no '{key}'")
    return config[key]


def _take(state: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in state:
        raise CheckpointError(f"{where}: weight '{key}' is missing")
    return state[key]


def from_diffusers(config: Mapping[str, Any], state: Mapping[str, torch.Tensor],
                   where: str = "diffusers model") -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """diffusers' config and state dict -> (DiT keywords, state dict in our layout).

    A setting our DiT cannot compute, copies of the embedders that differ between blocks, a
    missing weight, or one left over, is a CheckpointError naming it."""
    for key, value in _FIXED:
        got = config.get(key, value)
        if got != value:
            raise CheckpointError(f"{where}: {CONFIG} '{key}' is {got!r}; noisevalue's DiT computes only {value!r}")
    heads = int(_config_value(config, "num_attention_heads", where))
    hidden = heads * int(_config_value(config, "attention_head_dim", where))
    depth = int(_config_value(config, "num_layers", where))
    channels = int(config.get("in_channels", 4))
    out_channels = int(config.get("out_channels") or channels)
    if out_channels not in (channels, 2 * channels):
        raise CheckpointError(f"{where}: out_channels {out_channels} is neither in_channels ({channels}) nor twice "
                              "it (epsilon, or epsilon and the learned variance)")
    classes = _config_value(config, "num_embeds_ada_norm", where)
    if not isinstance(classes, int) or classes < 1:
        raise CheckpointError(f"{where}: {CONFIG} 'num_embeds_ada_norm' is {classes!r}; expected the number of classes")
    ours: dict[str, torch.Tensor] = {}
    used: set[str] = set()

    def put(mine: str, theirs: str) -> None:
        for suffix in (".weight", ".bias"):
            ours[mine + suffix] = _take(state, theirs + suffix, where)
            used.add(theirs + suffix)

    for mine, theirs in _TOP.items():
        put(mine, theirs)
    for mine, theirs in _EMBEDDERS.items():
        put(mine, f"transformer_blocks.0.{theirs}")
    table = _take(state, "transformer_blocks.0.norm1.emb.class_embedder.embedding_table.weight", where)
    ours["y_embedder.embedding_table.weight"] = table
    for i in range(depth):
        src, dst = f"transformer_blocks.{i}.", f"blocks.{i}."
        for mine, theirs in _BLOCK.items():
            put(dst + mine, src + theirs)
        for suffix in (".weight", ".bias"):
            parts = [_take(state, f"{src}attn1.to_{n}{suffix}", where) for n in "qkv"]
            ours[f"{dst}attn.qkv{suffix}"] = torch.cat(parts)
            used.update(f"{src}attn1.to_{n}{suffix}" for n in "qkv")
        for name in [*(f"{t}{s}" for t in _EMBEDDERS.values() for s in (".weight", ".bias")),
                     "norm1.emb.class_embedder.embedding_table.weight"]:
            copy = _take(state, src + name, where)
            if i and not torch.equal(copy, state[f"transformer_blocks.0.{name}"]):
                raise CheckpointError(f"{where}: '{src}{name}' differs from block 0's copy; noisevalue's DiT has one "
                                      "timestep and class embedder shared by every block")
            used.add(src + name)
    extra = sorted(set(state) - used)
    if extra:
        raise CheckpointError(f"{where}: weight '{extra[0]}' has no place in a DiT"
                              + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    patch = int(_config_value(config, "patch_size", where))
    size = int(_config_value(config, "sample_size", where))
    grid = (size // patch) ** 2
    ours["pos_embed"] = get_2d_sincos_pos_embed(hidden, size // patch).float().reshape(1, grid, hidden)
    mlp_hidden = ours["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * hidden
    kwargs = dict(input_size=size, patch_size=patch, in_channels=channels, hidden_size=hidden, depth=depth,
                  num_heads=heads, mlp_ratio=mlp_hidden / hidden, num_classes=int(classes),
                  class_dropout_prob=0.1 if table.shape[0] == int(classes) + 1 else 0.0,
                  learn_sigma=out_channels == 2 * channels,
                  time_freq_shift=0 if config.get("_class_name") == REFERENCE_CLASS else 1,
                  mlp_norm_eps=float(config.get("norm_eps", 1e-5)))
    return kwargs, ours


def to_diffusers(model: torch.nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A DiT -> (diffusers config, state dict). The config's ``_class_name`` is the class
    that computes what the DiT computes: ``DiTTransformer2DModel`` for a DiT built with
    ``time_freq_shift=1``, :class:`~noisevalue.backbones.diffusers_dit.ReferenceDiTTransformer2DModel`
    (the reference timestep features) otherwise. An unconditional DiT has no diffusers
    counterpart (its DiT always embeds a class): a CheckpointError."""
    if not isinstance(model, DiT):
        raise CheckpointError(f"only a DiT converts to diffusers' {DIFFUSERS_CLASS}, not {type(model).__name__}")
    name = getattr(model, "config_name", "DiT")
    if model.y_embedder is None:
        raise CheckpointError(f"{name} is unconditional; diffusers' {DIFFUSERS_CLASS} always embeds a class label")
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    hidden = state["pos_embed"].shape[-1]
    depth = len(model.blocks)
    out: dict[str, torch.Tensor] = {}

    def put(mine: str, theirs: str) -> None:
        for suffix in (".weight", ".bias"):
            out[theirs + suffix] = state[mine + suffix].clone()

    for mine, theirs in _TOP.items():
        put(mine, theirs)
    for i in range(depth):
        src, dst = f"blocks.{i}.", f"transformer_blocks.{i}."
        for mine, theirs in {**_BLOCK, **_EMBEDDERS}.items():
            put(src + mine if mine in _BLOCK else mine, dst + theirs)
        out[dst + "norm1.emb.class_embedder.embedding_table.weight"] = state["y_embedder.embedding_table.weight"].clone()
        for suffix in (".weight", ".bias"):
            for n, part in zip("qkv", state[f"{src}attn.qkv{suffix}"].chunk(3), strict=True):
                out[f"{dst}attn1.to_{n}{suffix}"] = part.clone()
    config = {
        "_class_name": DIFFUSERS_CLASS if model.t_embedder.freq_shift == 1 else REFERENCE_CLASS,
        "num_attention_heads": model.num_heads,
        "attention_head_dim": hidden // model.num_heads,
        "in_channels": model.in_channels,
        "out_channels": model.out_channels,
        "num_layers": depth,
        "sample_size": model.input_size,
        "patch_size": model.patch_size,
        "num_embeds_ada_norm": model.num_classes,
        "norm_eps": _mlp_norm_eps(model),
        **dict(_FIXED),
    }
    mlp_hidden = state["blocks.0.mlp.fc1.weight"].shape[0] if depth else 4 * hidden
    if mlp_hidden != 4 * hidden:
        raise CheckpointError(f"{name}: MLP width {mlp_hidden} is not 4x the hidden size {hidden}, "
                              f"the only width diffusers' {DIFFUSERS_CLASS} builds")
    return config, out
