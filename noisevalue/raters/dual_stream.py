"""The dual-stream DiT noise rater ``phi_eta(eps, t, x0, y) -> score`` (paper App. B.1).

Two token streams -- the clean latent ``x0`` and a candidate noise ``eps`` -- are
patchified by independent PatchEmbeds, share one frozen 2D sin-cos position embedding and
get a learnable per-stream type embedding. Every block keeps a separate residual path per
stream (own MLP and own adaLN modulation, all produced by one ``Linear(D, 12 D)``); the
only sublayer the streams share is attention, which runs over the concatenated ``2T``
tokens (joint attention as in SD3's MMDiT). The head drops the image tokens, mean-pools
the noise tokens, layer-normalises and maps to one scalar. Because the image tokens are
dropped, the last block only uses them as keys and values: it has no image-stream MLP,
gates or queries (they could never affect the score nor receive a gradient).

Initialisation is Xavier-uniform for every linear layer (biases zero), deliberately *not*
adaLN-Zero. With adaLN-Zero the gates and the head start at zero, so every candidate noise
gets the same score, the group softmax gives constant weights, the inner loss no longer
depends on the rater and the meta-gradient is exactly zero: training never starts.

The forward is a pure function of parameters and inputs (no dropout, no BatchNorm, no
in-place updates of inputs), so ``torch.func.functional_call``, ``jvp`` and double backward
work. As for the DiT backbone, forward-mode AD and double backward need the math SDPA
kernel (``sdpa_kernel(SDPBackend.MATH)``) or :func:`noisevalue.attention.blocked_sdpa`.
"""

from __future__ import annotations

from functools import partial
from typing import Any, cast

import torch
from timm.models.vision_transformer import Mlp, PatchEmbed
from torch import nn

from noisevalue.attention import sdpa
from noisevalue.backbones.dit import (
    TimestepEmbedder,
    get_2d_sincos_pos_embed,
    modulate,
    shape_problem,
)
from noisevalue.errors import ConfigError
from noisevalue.interfaces import Rater
from noisevalue.recompute import checkpointed_call

__all__ = [
    "DualStreamRater",
    "JointAttention",
    "DualStreamBlock",
    "dual_stream",
    "dual_stream_shared",
    "dual_stream_tiny",
]

IMAGE, NOISE = "image", "noise"
_MODS = 6  # shift, scale, gate for attention and for the MLP, per stream
_TYPE_STD = 0.02  # the stream type embeddings, as DiT initialises its tables
# The class table and the constant conditioning vector start at about the per-coordinate
# scale of the timestep embedding at init (~0.36 for D=384), so the adaLN gates start at
# similar magnitudes in every ablation. (DiT's N(0, 0.02) would make the label-only rater's
# modulations ~20x smaller than the full rater's; DiT can afford that with adaLN-Zero.)
_COND_STD = 0.35


class JointAttention(nn.Module):
    """Multi-head self-attention over the concatenation of several named token streams.

    ``forward(streams)`` takes a list of ``[N, T_i, D]`` tensors (in the order of ``streams``)
    and returns the attention outputs of the ``outputs`` streams only: every token serves as
    key and value, but queries are formed only for streams whose output is used. With
    ``per_stream_weights=False`` (default) one ``qkv`` / ``proj`` pair serves all tokens, i.e.
    attention is a single shared sublayer; with ``True`` each stream has its own projections
    as in SD3's MMDiT (the attention itself is joint either way).
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        streams: tuple[str, ...],
        per_stream_weights: bool = False,
        outputs: tuple[str, ...] | None = None,
    ):
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.streams = streams
        self.outputs = streams if outputs is None else outputs
        self.per_stream_weights = per_stream_weights
        self.qkv: nn.Module
        self.proj: nn.Module
        if per_stream_weights:
            self.qkv = nn.ModuleDict({s: nn.Linear(dim, 3 * dim) for s in streams})
            self.proj = nn.ModuleDict({s: nn.Linear(dim, dim) for s in self.outputs})
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
            self.proj = nn.Linear(dim, dim)

    def forward(self, streams: list[torch.Tensor]) -> list[torch.Tensor]:
        lengths = [x.shape[1] for x in streams]
        if self.per_stream_weights:
            qkv_layers = cast(nn.ModuleDict, self.qkv)
            qkv = torch.cat(
                [qkv_layers[s](x) for s, x in zip(self.streams, streams, strict=True)], dim=1
            )
        else:
            qkv = self.qkv(torch.cat(streams, dim=1))
        n, length, _ = qkv.shape
        qkv = qkv.reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # [N, heads, L, head_dim]
        out_lengths = lengths
        if self.outputs != self.streams:
            q_parts = dict(zip(self.streams, q.split(lengths, dim=2), strict=True))
            q = torch.cat([q_parts[s] for s in self.outputs], dim=2)
            out_lengths = [lengths[self.streams.index(s)] for s in self.outputs]
        out = sdpa(q, k, v)
        out = out.transpose(1, 2).reshape(n, q.shape[2], self.num_heads * self.head_dim)
        if self.per_stream_weights:
            proj_layers = cast(nn.ModuleDict, self.proj)
            parts = out.split(out_lengths, dim=1)
            return [proj_layers[s](x) for s, x in zip(self.outputs, parts, strict=True)]
        return list(self.proj(out).split(out_lengths, dim=1))

    def _qkv(self, stream: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        layer = cast(nn.ModuleDict, self.qkv)[stream] if self.per_stream_weights else self.qkv
        n, length, _ = x.shape
        qkv = layer(x).reshape(n, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return q, k, v

    def _project(self, stream: str, out: torch.Tensor) -> torch.Tensor:
        n, _, length, _ = out.shape
        out = out.transpose(1, 2).reshape(n, length, self.num_heads * self.head_dim)
        layer = cast(nn.ModuleDict, self.proj)[stream] if self.per_stream_weights else self.proj
        return layer(out)

    def forward_shared(self, image: torch.Tensor, noise: torch.Tensor) -> list[torch.Tensor]:
        """The shared-image-stream pattern: ``image`` ``[N, T, D]`` attends to itself only,
        so it is computed once per sample; ``noise`` ``[N * k, T, D]`` (k candidates per
        sample, sample-major) attends to its sample's image tokens and to itself. Returns
        the outputs of the ``outputs`` streams."""
        k = noise.shape[0] // image.shape[0]
        q_i, k_i, v_i = self._qkv(IMAGE, image)
        q_n, k_n, v_n = self._qkv(NOISE, noise)
        keys = torch.cat([k_i.repeat_interleave(k, 0), k_n], dim=2)
        values = torch.cat([v_i.repeat_interleave(k, 0), v_n], dim=2)
        out = {NOISE: self._project(NOISE, sdpa(q_n, keys, values))}
        if IMAGE in self.outputs:
            out[IMAGE] = self._project(IMAGE, sdpa(q_i, k_i, v_i))
        return [out[s] for s in self.outputs]


class DualStreamBlock(nn.Module):
    """One block: per-stream modulated LayerNorm + MLP residual paths, joint attention.

    ``streams`` names the residual paths in order (``("image", "noise")`` or ``("noise",)``).
    ``adaLN_modulation`` maps the conditioning to 6 values per stream and channel, chunked
    stream by stream into (shift, scale, gate) for attention, then for the MLP.

    ``context_only`` names streams whose output is discarded after this block (the image
    stream in the last block, whose tokens the head drops). Such a stream only provides keys
    and values: it gets just the 2 attention (shift, scale) values and no gate, MLP, query
    or per-stream output projection -- parameters that could never receive a gradient
    (SD3's ``context_pre_only``). The computed scores are the same as with them.
    The LayerNorms have no parameters (as in DiT), so one module serves every stream.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float,
        streams: tuple[str, ...],
        per_stream_attention_weights: bool = False,
        context_only: tuple[str, ...] = (),
    ):
        super().__init__()
        self.streams = streams
        self.outputs = tuple(s for s in streams if s not in context_only)
        self.num_mods = {s: _MODS if s in self.outputs else 2 for s in streams}
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = JointAttention(
            hidden_size, num_heads, streams, per_stream_attention_weights, self.outputs
        )
        gelu = cast(type[nn.Module], partial(nn.GELU, approximate="tanh"))
        self.mlp = nn.ModuleDict(
            {
                s: Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=gelu, drop=0)
                for s in self.outputs
            }
        )
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, sum(self.num_mods.values()) * hidden_size)
        )

    def forward(
        self, x: dict[str, torch.Tensor], c: torch.Tensor, shared_k: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``shared_k``: the shared-image-stream pattern (:meth:`JointAttention.forward_shared`)
        with ``x["image"]`` and ``c`` per sample and ``x["noise"]`` per candidate (k each)."""
        chunks = self.adaLN_modulation(c).chunk(sum(self.num_mods.values()), dim=1)
        mods: dict[str, tuple[torch.Tensor, ...]] = {}
        start = 0
        for s in self.streams:
            mods[s] = chunks[start : start + self.num_mods[s]]
            if shared_k is not None and s == NOISE:
                mods[s] = tuple(m.repeat_interleave(shared_k, 0) for m in mods[s])
            start += self.num_mods[s]
        normed = [modulate(self.norm1(x[s]), mods[s][0], mods[s][1]) for s in self.streams]
        if shared_k is None:
            attended = self.attn(normed)
        else:
            attended = self.attn.forward_shared(*normed)
        out: dict[str, torch.Tensor] = {}
        for s, a in zip(self.outputs, attended, strict=True):
            _, _, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods[s]
            h = x[s] + gate_msa.unsqueeze(1) * a
            mlp_in = modulate(self.norm2(h), shift_mlp, scale_mlp)
            out[s] = h + gate_mlp.unsqueeze(1) * self.mlp[s](mlp_in)
        return out


class DualStreamRater(Rater):
    """SD3-style dual-stream DiT rater; see the module docstring.

    Ablation switches (paper Table 2): ``use_timestep=False`` drops the timestep embedder,
    ``use_image=False`` drops the whole image stream (attention over noise tokens only),
    ``use_label=False`` drops the class embedding. With no conditioning left, the adaLN
    input is a learned constant vector. ``num_classes=0`` builds an unconditional rater
    (no class embedding; ``y`` may be ``None``); otherwise the table has ``num_classes + 1``
    rows, the last one being the null label. ``per_stream_attention_weights=True`` gives
    each stream its own qkv/proj projections (SD3's MMDiT layout) instead of one shared set.

    ``noise_patch_size`` (default ``patch_size``) patchifies the noise on its own grid, with
    its own sin-cos positions: a coarser one gives fewer noise tokens, which attend to all
    image tokens (not the paper's; for cheaper selection).

    ``shared_image_stream=True`` is a cheaper variant (not the paper's): image tokens attend
    to image tokens only, noise tokens to both. The image stream then does not depend on the
    noise, so for k candidates of one sample it is computed once and its keys and values are
    shared (the rater is ``grouped``): per candidate only the noise stream is paid for. The
    parameters are the same as the joint rater's.
    """

    def __init__(
        self,
        input_size: int = 32,
        in_channels: int = 4,
        num_classes: int = 1000,
        patch_size: int = 2,
        hidden_size: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        mlp_ratio: float = 4.0,
        use_timestep: bool = True,
        use_image: bool = True,
        use_label: bool = True,
        per_stream_attention_weights: bool = False,
        shared_image_stream: bool = False,
        noise_patch_size: int | None = None,
    ):
        super().__init__()
        problem = shape_problem(input_size, patch_size, in_channels, depth, hidden_size, num_heads, num_classes)
        if problem is None and mlp_ratio <= 0:
            problem = f"mlp_ratio must be > 0, got {mlp_ratio}"
        noise_patch = patch_size if noise_patch_size is None else noise_patch_size
        if problem is None and (isinstance(noise_patch, bool) or not isinstance(noise_patch, int) or noise_patch < 1
                                or input_size % noise_patch):
            problem = f"noise_patch_size must be a positive divisor of input_size {input_size}, got {noise_patch_size}"
        if problem is not None:
            raise ConfigError(f"rater: {problem}")

        self.config: dict[str, Any] = {
            "input_size": input_size,
            "in_channels": in_channels,
            "num_classes": num_classes,
            "patch_size": patch_size,
            "hidden_size": hidden_size,
            "depth": depth,
            "num_heads": num_heads,
            "mlp_ratio": mlp_ratio,
            "use_timestep": use_timestep,
            "use_image": use_image,
            "use_label": use_label,
            "per_stream_attention_weights": per_stream_attention_weights,
            "shared_image_stream": shared_image_stream,
            "noise_patch_size": noise_patch_size,
        }
        if shared_image_stream and not use_image:
            raise ConfigError("rater: shared_image_stream needs the image stream (use_image=true)")
        self.shared_image_stream = shared_image_stream
        self.latent_shape = (in_channels, input_size, input_size)
        self.num_classes = num_classes
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.use_timestep = use_timestep
        self.use_image = use_image
        self.use_label = use_label
        self.streams: tuple[str, ...] = (IMAGE, NOISE) if use_image else (NOISE,)

        self.noise_patch_size = noise_patch

        def patch_embed(patch: int) -> PatchEmbed:
            return PatchEmbed(input_size, patch, in_channels, hidden_size, bias=True)

        # Independent patchifiers; the image ones exist only with the image stream.
        self.noise_embedder = patch_embed(noise_patch)
        self.noise_type_embed = nn.Parameter(torch.zeros(hidden_size))
        self.image_embedder = patch_embed(patch_size) if use_image else None
        self.image_type_embed = nn.Parameter(torch.zeros(hidden_size)) if use_image else None
        grid, noise_grid = input_size // patch_size, input_size // noise_patch
        # Frozen and deterministic: non-persistent buffers, neither parameters (so a
        # meta-optimizer's parameter dict holds only what is learned) nor in checkpoints.
        self.register_buffer(
            "pos_embed", torch.zeros(1, grid * grid, hidden_size), persistent=False
        )
        self.register_buffer(
            "noise_pos_embed", torch.zeros(1, noise_grid * noise_grid, hidden_size), persistent=False
        )

        self.t_embedder = TimestepEmbedder(hidden_size) if use_timestep else None
        self.y_embedder = (
            nn.Embedding(num_classes + 1, hidden_size) if use_label and num_classes > 0 else None
        )
        self.cond_const = (
            nn.Parameter(torch.zeros(hidden_size))
            if self.t_embedder is None and self.y_embedder is None
            else None
        )

        self.blocks = nn.ModuleList(
            [
                DualStreamBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio,
                    self.streams,
                    per_stream_attention_weights,
                    # The head drops the image tokens: the last block only reads them.
                    context_only=(IMAGE,) if use_image and i == depth - 1 else (),
                )
                for i in range(depth)
            ]
        )
        self.head_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.head = nn.Linear(hidden_size, 1)
        self.initialize_weights()

    @property
    def uses_labels(self) -> bool:
        """Whether the score depends on ``y`` (so class counts must match on reuse)."""
        return self.y_embedder is not None

    @property
    def grouped(self) -> bool:
        return self.shared_image_stream

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """Xavier-uniform for every linear layer and patch projection, zero biases, frozen
        sin-cos positions, small normal tables. No adaLN-Zero (see the module docstring)."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for embedder in (self.noise_embedder, self.image_embedder):
            if embedder is not None:
                w = embedder.proj.weight  # a linear map of the flattened patch, as in DiT
                nn.init.xavier_uniform_(w.view(w.shape[0], -1))
                nn.init.zeros_(cast(torch.Tensor, embedder.proj.bias))
        size = self.config["input_size"]
        for buffer, patch in ((self.pos_embed, self.patch_size), (self.noise_pos_embed, self.noise_patch_size)):
            cast(torch.Tensor, buffer).copy_(get_2d_sincos_pos_embed(self.hidden_size, size // patch)[None])
        for table in (self.noise_type_embed, self.image_type_embed):
            if table is not None:
                nn.init.normal_(table, std=_TYPE_STD)
        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.weight, std=_COND_STD)
        if self.cond_const is not None:
            nn.init.normal_(self.cond_const, std=_COND_STD)

    def condition(self, t: torch.Tensor, y: torch.Tensor | None, n: int) -> torch.Tensor:
        """The adaLN input ``[n, D]``: timestep MLP + class embedding, or the constant."""
        if self.cond_const is not None:
            return self.cond_const.expand(n, -1)
        c: torch.Tensor | None = None
        if self.t_embedder is not None:
            c = self.t_embedder(t)
        if self.y_embedder is not None:
            if y is None:
                raise ValueError(
                    f"the rater is class-conditional (num_classes={self.num_classes}) and needs "
                    f"labels y; pass y={self.num_classes} for the null label"
                )
            e = self.y_embedder(y)
            c = e if c is None else c + e
        assert c is not None
        return c

    def forward(
        self,
        noise: torch.Tensor,
        t: torch.Tensor,
        x0: torch.Tensor | None,
        y: torch.Tensor | None,
    ) -> torch.Tensor:
        """``noise``/``x0`` ``[N, C, H, W]``, ``t`` long ``[N]``, ``y`` long ``[N]`` or None.
        Returns scores ``[N]``. Without the image stream ``x0`` is ignored (may be None).
        A ``grouped`` rater also takes ``noise`` ``[N, k, C, H, W]`` and returns ``[N, k]``."""
        if noise.ndim == 5:
            if not self.shared_image_stream:
                raise ValueError("noise [N, k, C, H, W] needs shared_image_stream=True")
            n, k = noise.shape[:2]
            return self._shared(noise.flatten(0, 1), t, x0, y, k).reshape(n, k)
        if self.shared_image_stream:
            return self._shared(noise, t, x0, y, 1)
        tokens = self._tokens(noise, x0)
        c = self.condition(t, y, noise.shape[0])
        for block in self.blocks:
            tokens = checkpointed_call(block, tokens, c, enabled=self.gradient_checkpointing)
        return self._score(tokens[NOISE].mean(dim=1))  # image tokens are dropped

    def _shared(
        self, noise: torch.Tensor, t: torch.Tensor, x0: torch.Tensor | None, y: torch.Tensor | None, k: int
    ) -> torch.Tensor:
        """Scores ``[N * k]`` of k candidates per sample, the image stream computed once."""
        tokens = self._tokens(noise, x0)
        assert x0 is not None  # the shared variant has the image stream, so _tokens read x0
        c = self.condition(t, y, x0.shape[0])
        for block in self.blocks:
            tokens = {**tokens, **checkpointed_call(block, tokens, c, enabled=self.gradient_checkpointing, shared_k=k)}
        return self._score(tokens[NOISE].mean(dim=1))

    def _score(self, pooled: torch.Tensor) -> torch.Tensor:
        """The head in float32 even under autocast: candidates are ranked by their scores,
        and bf16's 8-bit mantissa would tie or swap scores within 0.4% of each other."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self.head(self.head_norm(pooled.to(self.head.weight.dtype))).squeeze(-1)

    def _tokens(self, noise: torch.Tensor, x0: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The input tokens of each stream (noise, and the image with the image stream), each
        patchified on its own grid with its positions and type embedding; inputs checked."""
        self._check_input("noise", noise)
        noise_pos = cast(torch.Tensor, self.noise_pos_embed).to(noise.dtype)
        tokens = {NOISE: self.noise_embedder(noise) + noise_pos + self.noise_type_embed}
        if self.image_embedder is not None:
            if x0 is None:
                raise ValueError("the rater reads the clean latent x0; got x0=None")
            self._check_input("x0", x0)
            assert self.image_type_embed is not None
            pos = cast(torch.Tensor, self.pos_embed).to(noise.dtype)
            tokens[IMAGE] = self.image_embedder(x0) + pos + self.image_type_embed
        return tokens

    def _check_input(self, name: str, x: torch.Tensor) -> None:
        if x.ndim != 4 or tuple(x.shape[1:]) != self.latent_shape:
            c, h, w = self.latent_shape
            raise ValueError(f"the rater expects {name} [N, {c}, {h}, {w}], got {list(x.shape)}")


def dual_stream(
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    patch_size: int = 2,
    hidden_size: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    use_timestep: bool = True,
    use_image: bool = True,
    use_label: bool = True,
    per_stream_attention_weights: bool = False,
    shared_image_stream: bool = False,
    noise_patch_size: int | None = None,
) -> DualStreamRater:
    """The paper's rater: DiT-S/2-sized blocks (depth 12, D 384, 6 heads, patch 2) on
    4x32x32 latents with 1000 classes. Every argument can be overridden.

    As in appendix B.1, attention is the one shared sublayer: a single multi-head
    self-attention (one qkv/proj set) over both streams' tokens, with per-stream MLPs and
    adaLN modulation (55.6M parameters). ``per_stream_attention_weights=True`` gives each
    stream its own qkv/proj weights as SD3's MMDiT does (62.6M). ``shared_image_stream=True``:
    the cheaper variant of :class:`DualStreamRater` (also registered as ``dual_stream_shared``)."""
    return DualStreamRater(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_size=patch_size,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        use_timestep=use_timestep,
        use_image=use_image,
        use_label=use_label,
        per_stream_attention_weights=per_stream_attention_weights,
        shared_image_stream=shared_image_stream,
        noise_patch_size=noise_patch_size,
    )


def dual_stream_tiny(
    input_size: int = 8,
    in_channels: int = 1,
    num_classes: int = 10,
    patch_size: int = 2,
    hidden_size: int = 64,
    depth: int = 2,
    num_heads: int = 4,
    mlp_ratio: float = 4.0,
    use_timestep: bool = True,
    use_image: bool = True,
    use_label: bool = True,
    per_stream_attention_weights: bool = False,
    shared_image_stream: bool = False,
    noise_patch_size: int | None = None,
) -> DualStreamRater:
    """A CPU-sized rater for 8x8 single-channel digits with 10 classes (shared attention, as
    :func:`dual_stream`)."""
    return dual_stream(
        input_size=input_size,
        in_channels=in_channels,
        num_classes=num_classes,
        patch_size=patch_size,
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        use_timestep=use_timestep,
        use_image=use_image,
        use_label=use_label,
        per_stream_attention_weights=per_stream_attention_weights,
        shared_image_stream=shared_image_stream,
        noise_patch_size=noise_patch_size,
    )


def dual_stream_shared(
    input_size: int = 32,
    in_channels: int = 4,
    num_classes: int = 1000,
    patch_size: int = 2,
    hidden_size: int = 384,
    depth: int = 12,
    num_heads: int = 6,
    mlp_ratio: float = 4.0,
    use_timestep: bool = True,
    use_label: bool = True,
    per_stream_attention_weights: bool = False,
    noise_patch_size: int | None = None,
) -> DualStreamRater:
    """The paper-sized rater with a shared image stream (``shared_image_stream=True``): the
    image tokens attend to themselves only, so the k candidates of a sample share them and
    selection pays for the noise stream alone (see :class:`DualStreamRater`). Not the
    paper's rater; its agreement with it is measured in ``docs/benchmarks.md``.
    ``noise_patch_size`` (e.g. 4 with ``patch_size`` 2) tokenizes the noise coarser, with a
    quarter of the tokens, and so a quarter of the per-candidate cost."""
    return DualStreamRater(
        input_size=input_size, in_channels=in_channels, num_classes=num_classes, patch_size=patch_size,
        hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        use_timestep=use_timestep, use_image=True, use_label=use_label,
        per_stream_attention_weights=per_stream_attention_weights, shared_image_stream=True,
        noise_patch_size=noise_patch_size,
    )
