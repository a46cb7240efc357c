"""diffusers' ``DiTTransformer2DModel`` with the reference DiT's timestep features.

diffusers' DiT divides its timestep frequencies' exponent by ``half - 1``; the reference code,
and so every noisevalue DiT built with the default ``time_freq_shift=0``, by ``half``. This
subclass computes the reference features, so a DiT trained here is exported to a diffusers
pipeline that computes exactly what it computed. A pipeline folder names it by its module
path, which diffusers imports: loading needs noisevalue installed. A DiT trained with
``time_freq_shift=1`` is exported as the plain ``DiTTransformer2DModel``.
"""

from __future__ import annotations

import functools
from typing import Any, cast

from diffusers import DiTTransformer2DModel, ModelMixin
from diffusers.models.embeddings import Timesteps

# ModelMixin: a pipeline loading a component from a library other than its own looks up the
# library's base classes by name (as it finds PreTrainedModel in transformers) to learn that
# from_pretrained loads it
__all__ = ["ModelMixin", "ReferenceDiTTransformer2DModel"]


class ReferenceDiTTransformer2DModel(DiTTransformer2DModel):
    """``DiTTransformer2DModel`` whose timestep features are ``[cos(t f_i), sin(t f_i)]``
    with ``f_i = 10000 ** (-i / 128)``, as in the reference DiT (same config, same weights)."""

    @functools.wraps(DiTTransformer2DModel.__init__)  # type: ignore[misc]  # diffusers reads the config keys from it
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for block in cast(Any, self).transformer_blocks:
            emb = block.norm1.emb
            emb.time_proj = Timesteps(num_channels=emb.time_proj.num_channels, flip_sin_to_cos=True,
                                      downscale_freq_shift=0)
