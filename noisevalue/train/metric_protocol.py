"""The protocol of a stored metric: everything besides the weights that decides its number.

A sample metric (FID, the digit feature distances, KID) depends on the sampler, its steps,
eta and guidance, the number of samples, the reference and the feature network, and the code
that computes it; the held-out loss on its images and draws. FID mismatches between papers
and reproductions mostly come from these, so every stored metric carries its protocol:
``metrics.json`` keeps each protocol once, under its digest, and each evaluation row names the
digest of each of its metrics; ``eval.json`` holds the protocol of its number. The tables
flag a metric whose rows were computed under more than one protocol.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata
from typing import Any

ROW_KEY = "protocol"  # in an evaluation row: metric -> the digest of its protocol
SAMPLER = {"name": "ddim", "timestep_spacing": "trailing", "guided_channels": "all epsilon channels"}
DDPM = {"name": "ddpm", "timestep_spacing": "linspace", "guided_channels": "all epsilon channels",
        "variance": "learned_range when the model learns it, else the posterior's"}


def digest(protocol: dict[str, Any]) -> str:
    """A short content digest of a protocol (sha256 of its canonical JSON, 16 hex digits)."""
    return hashlib.sha256(json.dumps(protocol, sort_keys=True, default=str).encode()).hexdigest()[:16]


def version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def evaluator_code(name: str) -> dict[str, Any]:
    """The evaluator's code: its registry name, the distribution that provides it and that
    distribution's version (and, for the built-in Fréchet distances, the versions of the
    libraries that compute their features)."""
    from noisevalue import registry

    entry = next((e for e in registry.entries("evaluator") if e.name == name), None)
    dist = entry.distribution if entry is not None else "<unknown>"
    code: dict[str, Any] = {"name": name, "distribution": dist, "version": version(dist)}
    if name == "fid":
        code["libraries"] = {lib: version(lib) for lib in ("torchmetrics", "torch-fidelity")}
    return code


def sampling(num_steps: int, eta: float, cfg_scale: float, nag_scale: float, num_samples: int,
             use_ema: bool | None = None, sampler: str = "ddim") -> dict[str, Any]:
    """How the scored images were drawn."""
    chain = {**SAMPLER, "steps": int(num_steps), "eta": float(eta)} if sampler == "ddim" else \
        {**DDPM, "steps": int(num_steps)}
    out = {"sampler": chain, "guidance": float(cfg_scale),
           "nag_scale": float(nag_scale), "samples": int(num_samples)}
    if use_ema is not None:
        out["weights"] = "ema" if use_ema else "raw"
    return out


def sample_metric(sampled: dict[str, Any] | None, evaluator: Any, name: str, reference: dict[str, Any]) -> dict[str, Any]:
    """A sample metric's protocol: ``sampled`` (:func:`sampling`, None when the images'
    origin is unknown), the evaluator's features (its ``reference_key``: for FID, the
    Inception weights' digest), the reference's identity and digest, the code."""
    key = evaluator.reference_key() if hasattr(evaluator, "reference_key") else None
    return {"kind": "samples", "sampling": sampled, "features": key, "reference": reference,
            "evaluator": evaluator_code(name)}


def reference_identity(label: str, ref: Any, evaluator: Any) -> dict[str, Any]:
    """The reference named as the user gave it (``label``), with the digest of what its
    statistics under ``evaluator`` depend on (None for an evaluator that keeps none)."""
    from noisevalue.train.reference import reference_key

    keyed = callable(getattr(evaluator, "reference_key", None)) and evaluator.reference_key() is not None
    return {"label": label, "sha256": digest(reference_key(ref, evaluator)) if keyed else None}


def differences(protocols: list[dict[str, Any]]) -> list[str]:
    """The dotted keys whose values differ between ``protocols``."""
    flat = [flatten(p) for p in protocols]
    keys = sorted({k for f in flat for k in f})
    return [k for k in keys if len({json.dumps(f.get(k), sort_keys=True, default=str) for f in flat}) > 1]


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values."""
    if isinstance(node, dict) and node:
        out: dict[str, Any] = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}
