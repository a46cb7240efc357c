"""Latent encoders: pixel space (identity) and the Stable Diffusion VAE used by DiT."""

from __future__ import annotations

import json
import os
import socket
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import torch

from noisevalue.errors import DataError, WeightsUnavailableError
from noisevalue.files import state_digest
from noisevalue.interfaces import LatentEncoder

if TYPE_CHECKING:
    from diffusers import AutoencoderKL

__all__ = ["IdentityEncoder", "VAEEncoder", "DEFAULT_VAE", "SD_SCALE_FACTOR"]

DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
SD_SCALE_FACTOR = 0.18215
WEIGHT_FILES = "config.json + diffusion_pytorch_model.safetensors"


class IdentityEncoder(LatentEncoder):
    """Pixel-space diffusion: latents are the images themselves (``[-1, 1]``)."""

    cacheable = False
    pixel_space = True

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        return (int(channels), int(image_size), int(image_size))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents

    def fingerprint(self) -> dict[str, Any]:
        return {"name": "identity"}


class VAEEncoder(LatentEncoder):
    """A frozen diffusers ``AutoencoderKL`` (by default ``stabilityai/sd-vae-ft-mse``).

    ``encode(x) = scale_factor * z`` with ``z`` a sample of the posterior (as DiT does) or
    its mean when ``sample=False``; ``decode(z) = vae.decode(z / scale_factor)``.

    Weights come from ``local_path`` when given (a folder holding config.json and
    diffusion_pytorch_model.safetensors), otherwise from the Hugging Face cache, otherwise
    from the Hub. Without them a one-line :class:`WeightsUnavailableError` says how to
    supply them; it is raised at once when the Hub cannot be reached.

    The VAE is always in eval mode with ``requires_grad`` off; ``.to(device)`` moves it.
    """

    cacheable = True

    def __init__(
        self,
        pretrained: str = DEFAULT_VAE,
        local_path: str | None = None,
        scale_factor: float = SD_SCALE_FACTOR,
        sample: bool = True,
    ) -> None:
        super().__init__()
        self.pretrained = str(pretrained)
        self.local_path = None if local_path is None else str(local_path)
        self.scale_factor = float(scale_factor)
        self.sample = bool(sample)
        self._set_vae(_load_vae(self.pretrained, self.local_path))

    @classmethod
    def from_vae(
        cls,
        vae: AutoencoderKL,
        scale_factor: float = SD_SCALE_FACTOR,
        sample: bool = True,
        name: str = "<in-memory>",
    ) -> VAEEncoder:
        """Wrap an already built ``AutoencoderKL`` (tests, programmatic use)."""
        self = cls.__new__(cls)
        LatentEncoder.__init__(self)
        self.pretrained, self.local_path = name, None
        self.scale_factor, self.sample = float(scale_factor), bool(sample)
        self._set_vae(vae)
        return self

    def _set_vae(self, vae: Any) -> None:
        vae.requires_grad_(False)
        self.vae = vae.eval()
        config = vae.config
        self.latent_channels = int(config.latent_channels)
        self.in_channels = int(config.in_channels)
        self.downsample = 2 ** (len(config.block_out_channels) - 1)
        self._weights_sha256: str | None = None

    def train(self, mode: bool = True) -> VAEEncoder:
        super().train(mode)
        self.vae.eval()  # frozen: never in training mode
        return self

    def latent_shape(self, channels: int, image_size: int) -> tuple[int, int, int]:
        if channels != self.in_channels:
            raise DataError(
                f"the VAE encodes {self.in_channels}-channel images but the dataset has "
                f"{channels} channel(s)"
            )
        if image_size % self.downsample:
            raise DataError(
                f"the VAE needs an image size divisible by {self.downsample}; got {image_size}"
            )
        size = image_size // self.downsample
        return (self.latent_channels, size, size)

    @torch.no_grad()
    def encode(
        self, images: torch.Tensor, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Scaled latents ``[N, C, H/f, W/f]`` (float32) of images in ``[-1, 1]``.

        ``generator`` seeds the posterior sample (ignored when ``sample=False``).
        """
        param = next(self.vae.parameters())
        dist = self.vae.encode(images.to(device=param.device, dtype=param.dtype)).latent_dist
        z = dist.sample(generator=generator) if self.sample else dist.mean
        return (z * self.scale_factor).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        param = next(self.vae.parameters())
        z = latents.to(device=param.device, dtype=param.dtype) / self.scale_factor
        return self.vae.decode(z).sample.float()

    def fingerprint(self) -> dict[str, Any]:
        """What determines the latents: settings, VAE config and a hash of the weights."""
        if self._weights_sha256 is None:
            self._weights_sha256 = state_digest(self.vae.state_dict())
        config = {k: v for k, v in dict(self.vae.config).items() if not k.startswith("_")}
        return {
            "name": "sd_vae",
            "pretrained": self.pretrained,
            "scale_factor": self.scale_factor,
            "sample": self.sample,
            "config": json.loads(json.dumps(config, sort_keys=True, default=str)),
            "weights_sha256": self._weights_sha256,
        }


def _first_line(exc: BaseException) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = (lines[0] if lines else type(exc).__name__).rstrip(".")
    return text if len(text) <= 200 else text[:197] + "..."


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hugging Face endpoint opens within ``timeout``."""
    try:
        from huggingface_hub import constants
    except ImportError:
        return False
    offline = getattr(constants, "is_offline_mode", None)
    if offline() if callable(offline) else constants.HF_HUB_OFFLINE:
        return False
    url = urlparse(constants.ENDPOINT)
    if not url.hostname:
        return False
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname, port), timeout=timeout):
            return True
    except OSError:
        return False


@contextmanager
def _quiet_loading() -> Iterator[None]:
    """Silence diffusers' advisory warnings while loading, so failures read as one line."""
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        diffusers_logging.set_verbosity(level)


def _load_vae(pretrained: str, local_path: str | None) -> AutoencoderKL:
    """Load the VAE from ``local_path``, the local cache or the Hub, failing fast offline."""
    with _quiet_loading():
        return _load_vae_inner(pretrained, local_path)


def _load_vae_inner(pretrained: str, local_path: str | None) -> AutoencoderKL:
    from diffusers import AutoencoderKL

    folder = (
        local_path
        if local_path is not None
        else (pretrained if os.path.isdir(pretrained) else None)
    )
    if local_path is not None and not os.path.isdir(local_path):
        raise WeightsUnavailableError(
            f"params.local_path: folder '{local_path}' does not exist; it must hold "
            f"{WEIGHT_FILES}, e.g. as written by `hf download {DEFAULT_VAE} --local-dir DIR`"
        )
    if folder is not None:
        try:
            return AutoencoderKL.from_pretrained(folder, local_files_only=True)
        except Exception as exc:
            field = (
                "params.local_path"
                if local_path is not None
                else "params.pretrained"
            )
            raise WeightsUnavailableError(
                f"{field}: could not load VAE weights from '{folder}' ({_first_line(exc)}); "
                f"the folder must hold {WEIGHT_FILES}, e.g. as written by "
                f"`hf download {DEFAULT_VAE} --local-dir DIR`"
            ) from exc
    try:  # a previous download in the Hugging Face cache
        return AutoencoderKL.from_pretrained(pretrained, local_files_only=True)
    except Exception as exc:
        cache_error: Exception = exc
    if _hub_reachable():
        try:
            return AutoencoderKL.from_pretrained(pretrained)
        except Exception as exc:
            cache_error = exc
    raise WeightsUnavailableError(
        f"params.local_path: not set, and the VAE weights '{pretrained}' could not be loaded (offline?): "
        f"{_first_line(cache_error)}. On a machine with internet download the folder ({WEIGHT_FILES}) with "
        f"`hf download {pretrained} --local-dir DIR` (older huggingface_hub: `huggingface-cli download`), "
        "copy it here and set this key to DIR"
    ) from cache_error
