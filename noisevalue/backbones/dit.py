"""DiT: a diffusion transformer with adaLN-Zero conditioning (Peebles & Xie, 2023).

Parameter names and shapes follow the reference implementation (facebookresearch/DiT,
``models.py``), so its public checkpoints load with ``load_state_dict(strict=True)``.
Two deliberate differences in behaviour:

* ``forward`` is a pure function: it never drops labels at random. The caller drops
  labels itself by passing the null label ``y == num_classes``.
* ``forward_with_cfg`` guides *all* epsilon channels (the reference guides only the
  first three).

``time_freq_shift`` and ``mlp_norm_eps`` exist to compute exactly what diffusers'
``DiTTransformer2DModel`` computes (its timestep frequencies divide by ``half - 1``, its
MLP LayerNorm's eps is a config field); the defaults are the reference code's
(:mod:`noisevalue.backbones.dit_formats` converts between the layouts).

``num_classes=0`` builds an unconditional model without any label embedder.
Second derivatives need the math SDPA kernel (``sdpa_kernel(SDPBackend.MATH)``; the fused
CPU attention kernel has no double backward) or :func:`noisevalue.attention.blocked_sdpa`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from typing import cast

import torch
from timm.models.vision_transformer import Mlp, PatchEmbed
from torch import nn

from noisevalue.attention import SelfAttention
from noisevalue.errors import ConfigError
from noisevalue.interfaces import Backbone
from noisevalue.recompute import checkpointed_call

__all__ = ["DiT", "CONFIGS", "dit_config", "get_2d_sincos_pos_embed"]

_SIZES = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
# name -> (depth, hidden_size, num_heads, patch_size)
CONFIGS: dict[str, tuple[int, int, int, int]] = {
    f"DiT-{size}/{patch}": (*arch, patch) for size, arch in _SIZES.items() for patch in (2, 4, 8)
}
CONFIGS["DiT-Tiny/2"] = (4, 128, 4, 2)
CONFIGS["DiT-Tiny-B/2"] = (4, 192, 6, 2)  # 1.5x wider: the digits default's transfer target
# DiT-Tiny/2's and DiT-Tiny-B/2's 16 tokens at 32x32: the digits32 recipe and its transfer target
CONFIGS["DiT-Tiny/8"] = (4, 128, 4, 8)
CONFIGS["DiT-Tiny-B/8"] = (4, 192, 6, 8)


def dit_config(name: str) -> dict[str, int]:
    """The architecture of a named config, e.g. ``dit_config("DiT-S/2")["depth"] == 12``."""
    if name not in CONFIGS:
        raise ConfigError(f"unknown DiT config '{name}'; known: {', '.join(CONFIGS)}")
    return dict(
        zip(("depth", "hidden_size", "num_heads", "patch_size"), CONFIGS[name], strict=True)
    )


def _linear(seq: nn.Sequential, index: int) -> nn.Linear:
    return cast(nn.Linear, seq[index])


def shape_problem(
    input_size: int, patch_size: int, in_channels: int, depth: int, hidden_size: int,
    num_heads: int, num_classes: int,
) -> str | None:
    """What is wrong with a patch-transformer's shape settings, or None (shared with the rater)."""
    if patch_size < 1 or input_size < 1 or input_size % patch_size:
        return f"input_size {input_size} is not divisible by patch size {patch_size}"
    if in_channels < 1 or depth < 1:
        return f"in_channels ({in_channels}) and depth ({depth}) must be >= 1"
    if num_heads < 1 or hidden_size % num_heads or hidden_size % 4:
        return f"hidden size {hidden_size} must be divisible by 4 and by {num_heads} heads"
    if num_classes < 0:
        return f"num_classes must be >= 0 (0 = unconditional), got {num_classes}"
    return None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2D sin-cos position embedding ``[grid_size**2, embed_dim]`` (float64).

    Tokens are in row-major order. As in the reference code, the first half of the
    channels encodes the column (x) and the second half the row (y); each half is
    ``[sin(pos * omega), cos(pos * omega)]`` with ``omega_i = 10000 ** (-i / (D/4))``.
    """
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows = coords.repeat_interleave(grid_size)  # token index = row * grid_size + col
    cols = coords.repeat(grid_size)

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos[:, None] * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1)


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the (possibly fractional) timestep, then a SiLU MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, freq_shift: int = 0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.freq_shift = freq_shift

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000, freq_shift: int = 0) -> torch.Tensor:
        """``[cos(t f_i), sin(t f_i)]`` with ``f_i = max_period ** (-i / (dim // 2 - freq_shift))``."""
        half = dim // 2
        exponents = torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
        freqs = torch.exp(-math.log(max_period) * exponents)
        args = t[:, None].float() * freqs[None]
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size, freq_shift=self.freq_shift)
        return self.mlp(t_freq.to(_linear(self.mlp, 0).weight.dtype))


class LabelEmbedder(nn.Module):
    """A plain table lookup. Row ``num_classes`` (present when ``dropout_prob > 0``) is
    the null class for classifier-free guidance; dropping labels is the caller's job."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float):
        super().__init__()
        use_cfg_embedding = dropout_prob > 0
        self.embedding_table = nn.Embedding(num_classes + int(use_cfg_embedding), hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


class DiTBlock(nn.Module):
    """Transformer block whose LayerNorms are modulated (shift, scale, gate) by ``c``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, mlp_norm_eps: float = 1e-6):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads=num_heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=mlp_norm_eps)
        self.mlp = Mlp(
            in_features=hidden_size,
            hidden_features=int(hidden_size * mlp_ratio),
            act_layer=cast(type[nn.Module], partial(nn.GELU, approximate="tanh")),
            drop=0,
        )
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        modulation = self.adaLN_modulation(c).chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = modulation
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """Modulated LayerNorm, then a linear map of each token to a patch of outputs."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(Backbone):
    """Diffusion transformer predicting ``eps`` (and, with ``learn_sigma``, the variance
    interpolation ``v``) as ``[N, out_channels, H, W]``; the first ``in_channels`` output
    channels are epsilon. ``config_name`` (keyword) only labels the model; ``time_freq_shift``
    and ``mlp_norm_eps`` (keywords) select diffusers' numerics (module docstring)."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        *,
        config_name: str | None = None,
        time_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
    ):
        super().__init__()
        if config_name is None:
            arch = (depth, hidden_size, num_heads, patch_size)
            config_name = next((n for n, a in CONFIGS.items() if a == arch), "DiT-custom")
        self.config_name = config_name
        problem = shape_problem(input_size, patch_size, in_channels, depth, hidden_size, num_heads, num_classes)
        if problem is None and not 0 <= class_dropout_prob < 1:
            problem = f"class_dropout_prob must be in [0, 1), got {class_dropout_prob}"
        if problem is None and time_freq_shift not in (0, 1):
            problem = f"time_freq_shift must be 0 (the reference DiT) or 1 (diffusers), got {time_freq_shift!r}"
        if problem is None and not (isinstance(mlp_norm_eps, int | float) and mlp_norm_eps > 0):
            problem = f"mlp_norm_eps must be a number > 0, got {mlp_norm_eps!r}"
        if problem is not None:
            raise ConfigError(f"model: {problem} of {config_name}")

        self.input_size = input_size
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.learn_sigma = learn_sigma
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.class_dropout_prob = class_dropout_prob
        self.mlp_ratio = mlp_ratio

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size, freq_shift=time_freq_shift)
        self.y_embedder = (
            LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if num_classes > 0 else None
        )
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [DiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, mlp_norm_eps=mlp_norm_eps) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    @property
    def has_null_label(self) -> bool:
        """Whether label ``num_classes`` (the null class for guidance) exists."""
        return self.y_embedder is not None and self.class_dropout_prob > 0

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Xavier linears, frozen sin-cos ``pos_embed``, N(0, 0.02) embeddings, and
        adaLN-Zero: every modulation and the output layer start at zero."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        grid = self.input_size // self.patch_size
        self.pos_embed.copy_(get_2d_sincos_pos_embed(self.pos_embed.shape[-1], grid)[None])

        # The patch embedding is initialised like an nn.Linear over the flattened patch.
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(_linear(self.t_embedder.mlp, 0).weight, std=0.02)
        nn.init.normal_(_linear(self.t_embedder.mlp, 2).weight, std=0.02)

        blocks = [b for b in self.modules() if isinstance(b, DiTBlock)]
        zero_init = [_linear(b.adaLN_modulation, -1) for b in blocks]
        zero_init += [_linear(self.final_layer.adaLN_modulation, -1), self.final_layer.linear]
        for linear in zero_init:
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, T, p*p*C]`` tokens -> ``[N, C, H, W]`` image."""
        c, p = self.out_channels, self.patch_size
        h = w = self.input_size // p
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = x.permute(0, 5, 1, 3, 2, 4)  # n, c, h, p, w, q
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed_time(self, t: torch.Tensor) -> torch.Tensor:
        """The timestep's conditioning vector ``[N, D]`` (a subclass may add a null time)."""
        return self.t_embedder(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """``x`` ``[N, C, H, W]``, ``t`` ``[N]``, ``y`` ``[N]`` labels in ``[0, num_classes]``
        (``num_classes`` is the null label). An unconditional model ignores ``y``."""
        self._check_input(x)
        c = self.embed_time(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(
                    f"{self.config_name} is class-conditional (num_classes={self.num_classes}) "
                    f"and needs labels y; pass y={self.num_classes} for the null label"
                )
            c = c + self.y_embedder(y)
        h = self.x_embedder(x) + self.pos_embed
        for block in self.blocks:
            h = checkpointed_call(block, h, c, enabled=self.gradient_checkpointing)
        return self.unpatchify(self.final_layer(h, c))

    def forward_with_cfg(
        self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cfg_scale: float
    ) -> torch.Tensor:
        """Classifier-free guidance in one batched forward pass.

        The batch is ``[conditional half; unconditional half]`` as in the reference code:
        ``y`` holds the real labels then the null labels, and only the first half of ``x``
        is used (it is evaluated under both label sets). Returns ``[2n, out_channels, H, W]``
        with both halves equal to the guided output, so it drops into the reference
        sampling loop.

        Unlike the reference (which guides only channels ``[:3]``), *all* ``in_channels``
        epsilon channels are guided: ``eps = uncond + cfg_scale * (cond - uncond)``. The
        sigma channels (with ``learn_sigma``) are taken from the conditional half.
        """
        if not self.has_null_label:
            raise ValueError(
                f"{self.config_name}: classifier-free guidance needs a class-conditional model "
                "trained with class_dropout_prob > 0 (a null label)"
            )
        if x.shape[0] % 2:
            raise ValueError(f"forward_with_cfg needs an even batch, got {x.shape[0]}")
        half = x[: x.shape[0] // 2]
        out = self.forward(torch.cat([half, half], dim=0), t, y)
        cond, uncond = out.chunk(2, dim=0)
        k = self.in_channels
        eps = uncond[:, :k] + cfg_scale * (cond[:, :k] - uncond[:, :k])
        guided = torch.cat([eps, cond[:, k:]], dim=1)
        return torch.cat([guided, guided], dim=0)

    def _check_input(self, x: torch.Tensor) -> None:
        expected = (self.in_channels, self.input_size, self.input_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"{self.config_name} expects input [N, {expected[0]}, {expected[1]}, "
                f"{expected[2]}], got {list(x.shape)}"
            )


def _factory(
    name: str, size: int = 32, channels: int = 4, classes: int = 1000
) -> Callable[..., DiT]:
    """A builder for the named config with explicit keyword parameters (and defaults)."""
    depth, hidden_size, num_heads, patch_size = CONFIGS[name]

    def factory(
        input_size: int = size,
        in_channels: int = channels,
        num_classes: int = classes,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        mlp_ratio: float = 4.0,
        time_freq_shift: int = 0,
        mlp_norm_eps: float = 1e-6,
    ) -> DiT:
        return DiT(
            input_size=input_size,
            patch_size=patch_size,
            in_channels=in_channels,
            hidden_size=hidden_size,
            depth=depth,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            class_dropout_prob=class_dropout_prob,
            num_classes=num_classes,
            learn_sigma=learn_sigma,
            config_name=name,
            time_freq_shift=time_freq_shift,
            mlp_norm_eps=mlp_norm_eps,
        )

    factory.__name__ = factory.__qualname__ = name.replace("-", "_").replace("/", "_")
    factory.__doc__ = (
        f"{name}: depth {depth}, hidden size {hidden_size}, {num_heads} heads, patch {patch_size}."
    )
    return factory


DiT_S_2 = _factory("DiT-S/2")
DiT_S_4 = _factory("DiT-S/4")
DiT_S_8 = _factory("DiT-S/8")
DiT_B_2 = _factory("DiT-B/2")
DiT_B_4 = _factory("DiT-B/4")
DiT_B_8 = _factory("DiT-B/8")
DiT_L_2 = _factory("DiT-L/2")
DiT_L_4 = _factory("DiT-L/4")
DiT_L_8 = _factory("DiT-L/8")
DiT_XL_2 = _factory("DiT-XL/2")
DiT_XL_4 = _factory("DiT-XL/4")
DiT_XL_8 = _factory("DiT-XL/8")
# A CPU-sized model; its defaults fit 8x8 single-channel digits with 10 classes.
DiT_Tiny_2 = _factory("DiT-Tiny/2", size=8, channels=1, classes=10)
DiT_Tiny_B_2 = _factory("DiT-Tiny-B/2", size=8, channels=1, classes=10)
DiT_Tiny_8 = _factory("DiT-Tiny/8", size=32, channels=1, classes=10)
DiT_Tiny_B_8 = _factory("DiT-Tiny-B/8", size=32, channels=1, classes=10)
