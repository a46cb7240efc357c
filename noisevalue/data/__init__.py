"""Datasets, latent encoders and the on-disk latent cache.

* :class:`DigitsDataset` (``digits``): scikit-learn's bundled 8x8 digits, no download.
* :class:`ImageFolderDataset` (``image_folder``): ImageNet-style class folders or a flat
  folder of images, with the ADM centre crop (:func:`adm_center_crop`).
* :class:`IdentityEncoder` (``identity``): pixel-space diffusion.
* :class:`VAEEncoder` (``sd_vae``): the frozen Stable Diffusion VAE that DiT uses.
* :func:`build_latent_cache`, :func:`finalize_latent_cache`, :class:`LatentCacheDataset`:
  encode a dataset once into sharded safetensors files (safe under several processes)
  and read them back memory-mapped.

The names in brackets are the registry names (entry points) used in recipes.
"""

from noisevalue.data.digits import DigitsDataset
from noisevalue.data.encoders import IdentityEncoder, VAEEncoder
from noisevalue.data.image_folder import ImageFolderDataset, adm_center_crop
from noisevalue.data.latent_cache import (
    LatentCacheDataset,
    build_latent_cache,
    finalize_latent_cache,
)

__all__ = [
    "DigitsDataset",
    "ImageFolderDataset",
    "adm_center_crop",
    "IdentityEncoder",
    "VAEEncoder",
    "build_latent_cache",
    "finalize_latent_cache",
    "LatentCacheDataset",
]
