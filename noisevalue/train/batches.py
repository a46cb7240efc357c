"""Deterministic, world-size-independent batching and per-step randomness.

Every random draw of a training step (data order, timesteps, noises, label-dropout and
flip masks) comes from a generator seeded by ``(seed, step, stream)`` and is drawn for the
*global* batch; each rank then takes its own contiguous slice. Consequences:

* resuming at step s replays exactly what the uninterrupted run would have drawn;
* N processes with B/N samples each see exactly the samples, noises and timesteps one
  process with B samples sees, so their averaged gradients agree to float tolerance;
* ranks hold disjoint shards of every global batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from noisevalue.errors import ConfigError

STREAM_ORDER = 0
STREAM_TRAIN = 1
STREAM_SAMPLE = 2
STREAM_EVAL = 3
STREAM_META = 4
STREAM_VAL = 5
STREAM_SPLIT = 6
STREAM_PROBE = 7  # the fixed meta-signal probe problem
STREAM_ORACLE = 8  # the oracle selector's validation batches
STREAM_HELDOUT = 9  # the held-out loss's fixed (t, noise) draws
STREAM_SELECT = 10  # a stochastic selector's per-step generator
STREAM_TIMESTEP = 11  # a timestep sampler's per-step uniform draws
STREAM_TIME_DROP = 12  # which samples' time condition is dropped (Noise Awareness Guidance)


def seeded_generator(*key: int) -> torch.Generator:
    """A CPU generator whose seed mixes all of ``key`` (SeedSequence hashing)."""
    state = np.random.SeedSequence([int(k) & 0xFFFFFFFF for k in key]).generate_state(2)
    g = torch.Generator()
    g.manual_seed(int(state[0]) << 32 | int(state[1]))
    return g


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
    """Random draws for one global batch (CPU tensors)."""

    t: torch.Tensor  # [B] long
    noise: torch.Tensor  # [B, k, C, H, W]
    drop: torch.Tensor  # [B] bool, label dropped to the null class
    flip: torch.Tensor  # [B] bool, horizontal flip

    def slice(self, start: int, stop: int) -> StepDraws:
        return StepDraws(self.t[start:stop], self.noise[start:stop], self.drop[start:stop], self.flip[start:stop])


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
) -> StepDraws:
    # Noise last: runs that differ only in k (vanilla vs. selection among k candidates)
    # share their data order, timesteps, label drops and flips.
    g = seeded_generator(seed, step, stream)
    t = torch.randint(0, num_timesteps, (batch,), generator=g)
    drop = torch.rand(batch, generator=g) < drop_prob
    flips = (torch.rand(batch, generator=g) < 0.5) & flip
    noise = torch.randn((batch, k, *shape), generator=g)
    return StepDraws(t, noise, drop, flips)


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
