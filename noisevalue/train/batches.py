"""Deterministic, world-size-independent batching and per-step randomness.

Every random draw of a training step comes from generators seeded by ``(seed, step,
stream)``. The cheap ones (data order, timesteps, label-dropout and flip masks: one number
per sample) are drawn for the *global* batch and each rank takes its contiguous slice; the
noise, the bulk of the draws, is drawn per sample (sample ``i`` of the global batch from its
own generator), so a rank draws its own rows only. Consequences:

* resuming at step s replays exactly what the uninterrupted run would have drawn;
* N processes with B/N samples each see exactly the samples, noises and timesteps one
  process with B samples sees, so their averaged gradients agree to float tolerance;
* ranks hold disjoint shards of every global batch;
* candidate ``j`` of a sample is the same whatever ``k`` is: the k candidates are drawn one
  after another from the sample's generator, so a vanilla run (k=1) trains on candidate 0
  of the pool every selector of the same seed sees.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noisevalue.errors import ConfigError

STREAM_ORDER = 0
STREAM_TRAIN = 1
# 2: a run's sample grid until it drew per image (STREAM_GRID)
STREAM_EVAL = 3  # the evaluation's pixel-shuffled baseline
STREAM_META = 4
STREAM_VAL = 5
STREAM_SPLIT = 6
STREAM_PROBE = 7  # the fixed meta-signal probe problem
STREAM_ORACLE = 8  # the oracle selector's validation batches
STREAM_HELDOUT = 9  # the held-out loss's fixed (t, noise) draws
STREAM_SELECT = 10  # a stochastic selector's per-step generator
STREAM_TIMESTEP = 11  # a timestep sampler's per-step uniform draws
STREAM_TIME_DROP = 12  # which samples' time condition is dropped (Noise Awareness Guidance)
STREAM_SAMPLES = 16  # one generator per sampled image: evaluations and `noisevalue sample`
STREAM_GRID = 17  # one generator per image of a run's sample grid
_ROW_NOISE = 1  # a fifth key word: a sample's noise generator is (seed, step, stream, 1, i)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed mixes all of ``key`` (SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


def image_generators(seed: int, start: int, stop: int, stream: int = STREAM_SAMPLES) -> list[torch.Generator]:
    """One generator per image ``start..stop-1``, seeded by ``(seed, i, stream)``: what an
    image is depends on its index only, not on the batch or the process that draws it. The
    index takes the place of a step in the key, the stream the place of a stream, so no
    image shares its generator with a training step's draws."""
    return [seeded_generator(seed, i, stream) for i in range(start, stop)]


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` on ``device``; to a GPU through pinned memory, without waiting for the copy."""
    if device.type != "cuda" or tensor.device.type == "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def local_batch_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ConfigError(
            f"train.global_batch_size: {global_batch} is not divisible by the "
            f"{world_size} processes"
        )
    return global_batch // world_size


class GlobalOrder:
    """Epoch-wise random permutations of ``n`` items, read as one endless stream."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=seeded_generator(self.seed, epoch, STREAM_ORDER))
            self._epoch = epoch
        return self._perm

    def batch(self, step: int, batch_size: int) -> torch.Tensor:
        start = step * batch_size
        out: list[int] = []
        while len(out) < batch_size:
            epoch, offset = divmod(start + len(out), self.n)
            take = min(batch_size - len(out), self.n - offset)
            out.extend(self._permutation(epoch)[offset : offset + take].tolist())
        return torch.tensor(out, dtype=torch.long)


@dataclass
class StepDraws:
    """Random draws for rows of one global batch (CPU tensors)."""

    t: torch.Tensor  # [B] long
    noise: torch.Tensor  # [B, k, C, H, W]
    drop: torch.Tensor  # [B] bool, label dropped to the null class
    flip: torch.Tensor  # [B] bool, horizontal flip


def draw_step(
    seed: int,
    step: int,
    batch: int,
    shape: tuple[int, ...],
    num_timesteps: int,
    drop_prob: float,
    flip: bool,
    k: int = 1,
    stream: int = STREAM_TRAIN,
    rows: tuple[int, int] | None = None,
) -> StepDraws:
    """The draws of rows ``rows = (lo, hi)`` (default: all) of the global batch of ``batch``
    samples at ``step``: :func:`draw_conditions` and :func:`draw_noise`."""
    lo, hi = rows if rows is not None else (0, batch)
    t, drop, flips = draw_conditions(seed, step, batch, num_timesteps, drop_prob, flip, stream)
    return StepDraws(t[lo:hi], draw_noise(seed, step, lo, hi, shape, k, stream), drop[lo:hi], flips[lo:hi])


def draw_conditions(
    seed: int, step: int, batch: int, num_timesteps: int, drop_prob: float, flip: bool, stream: int = STREAM_TRAIN
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(timesteps, label drops, flips) of the whole global batch, from the step's generator."""
    g = seeded_generator(seed, step, stream)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    drop = torch.rand(batch, generator=g) < drop_prob
    flips = (torch.rand(batch, generator=g) < 0.5) & flip
    return t, drop, flips


def draw_noise(seed: int, step: int, lo: int, hi: int, shape: tuple[int, ...], k: int = 1,
               stream: int = STREAM_TRAIN) -> torch.Tensor:
    """``[hi - lo, k, *shape]``: the k candidate noises of rows ``lo..hi-1``, each row from its
    own generator, one candidate after another (candidate j does not depend on k)."""
    noise = torch.empty((hi - lo, k, *shape))
    for i in range(lo, hi):
        g = seeded_generator(seed, step, stream, _ROW_NOISE, i)
        for j in range(k):
            noise[i - lo, j] = torch.randn(shape, generator=g)
    return noise


def validation_split(n: int, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, validation indices): a seeded random ``fraction`` of ``n`` held out
    (``meta.val_fraction``; the meta-training split, also the oracle selector's)."""
    n_val = int(round(n * fraction))
    if n_val < 1 or n_val >= n:
        raise ConfigError(
            f"meta.val_fraction: {fraction} of {n} training items leaves "
            f"{'no validation' if n_val < 1 else 'no training'} data"
        )
    perm = torch.randperm(n, generator=seeded_generator(seed, 0, STREAM_SPLIT))
    return perm[n_val:], perm[:n_val]
