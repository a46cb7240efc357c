"""DiT with a learned null-time embedding (Noise Awareness Guidance, classifier-free form).

The trainer replaces the time condition of a ``time_dropout_prob`` share of the samples by
``NULL_TIMESTEP`` (the noise level itself is unchanged); this backbone maps that value to a
learned vector in place of the timestep embedding. At sampling,
``eps = eps(x, t) + w * (eps(x, t) - eps(x, null_t))`` (``sample.nag_scale`` w) pushes the
prediction away from the one that does not know the noise level, which counters the drift
of the sampler's actual noise level from the schedule.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from noisevalue.backbones.dit import CONFIGS, DiT
from noisevalue.errors import ConfigError
from noisevalue.interfaces import NULL_TIMESTEP


class NAGDiT(DiT):
    def __init__(self, *args: object, time_dropout_prob: float = 0.1, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        if isinstance(time_dropout_prob, bool) or not isinstance(time_dropout_prob, int | float) or not (
            0 < time_dropout_prob < 1
        ):
            raise ConfigError(f"model: time_dropout_prob must be in (0, 1), got {time_dropout_prob!r}")
        self.time_dropout_prob = float(time_dropout_prob)
        hidden = self.t_embedder.mlp[-1].out_features
        self.null_time = nn.Parameter(torch.randn(hidden) * 0.02)  # as DiT initialises its tables

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        null = t == NULL_TIMESTEP
        c = self.t_embedder(t.clamp_min(0))
        return torch.where(null[:, None], self.null_time.to(c.dtype).expand_as(c), c)


def _factory(name: str, size: int = 32, channels: int = 4, classes: int = 1000) -> Callable[..., NAGDiT]:
    depth, hidden_size, num_heads, patch_size = CONFIGS[name]

    def factory(
        input_size: int = size,
        in_channels: int = channels,
        num_classes: int = classes,
        class_dropout_prob: float = 0.1,
        time_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
    ) -> NAGDiT:
        return NAGDiT(
            input_size=input_size, patch_size=patch_size, in_channels=in_channels, hidden_size=hidden_size,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio, class_dropout_prob=class_dropout_prob,
            num_classes=num_classes, learn_sigma=learn_sigma, config_name=f"NAG-{name}",
            time_dropout_prob=time_dropout_prob,
        )

    factory.__name__ = factory.__qualname__ = "NAG_" + name.replace("-", "_").replace("/", "_")
    factory.__doc__ = f"NAG-{name}: {name} with a learned null time (time_dropout_prob, default 0.1)."
    return factory


NAG_DiT_S_2 = _factory("DiT-S/2")
NAG_DiT_B_2 = _factory("DiT-B/2")
NAG_DiT_L_2 = _factory("DiT-L/2")
NAG_DiT_XL_2 = _factory("DiT-XL/2")
NAG_DiT_Tiny_2 = _factory("DiT-Tiny/2", size=8, channels=1, classes=10)
