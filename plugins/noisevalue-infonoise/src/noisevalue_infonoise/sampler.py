"""InfoNoise: the training timesteps follow the running epsilon-loss profile over log-SNR.

Through I-MMSE, the rate at which a noisy observation at log-SNR ``lambda`` reduces the
uncertainty about the clean sample is ``d I / d lambda = mmse_eps(lambda) / 2``: the
epsilon-prediction error at that noise level. InfoNoise estimates that profile online from
the losses training computes anyway and allocates training to it:

1. every step, each sample's (unweighted) epsilon loss is added to its bin on a fixed grid
   of ``bins`` equal-width log-SNR bins spanning the schedule;
2. every ``refresh_every`` steps, the bins' mean losses update a running profile by an EMA
   (``ema``; a bin with no sample keeps its value), smoothed by a moving average over
   ``2 * smooth + 1`` bins;
3. the target density over log-SNR is that profile times a gate that switches the lowest
   noise levels off: ``1 / (1 + exp((lambda - gate) / gate_width))``;
4. the training distribution is the target divided by the loss weight (so the effective
   allocation, distribution x weight, is the target), turned into a probability per
   discrete timestep (density x the log-SNR width of each step), mixed with ``floor`` of
   the uniform distribution so no timestep is abandoned, and sampled by inverse CDF.

Before the first refresh the timesteps are uniform. The state (accumulators, profile, the
current distribution and its history at every refresh) is a tensor dict saved with each
checkpoint, so a resumed run samples exactly what an uninterrupted one does.
"""

from __future__ import annotations

import math

import torch

from noisevalue.interfaces import TimestepSampler


def _check(name: str, value: float, low: float, high: float, closed_high: bool = False) -> float:
    ok = not isinstance(value, bool) and isinstance(value, int | float) and math.isfinite(value)
    ok = ok and low <= value and (value <= high if closed_high else value < high)
    if not ok:
        bracket = "]" if closed_high else ")"
        raise ValueError(f"timestep sampler 'infonoise': {name} must be in [{low}, {high}{bracket}, got {value!r}")
    return float(value)


class InfoNoise(TimestepSampler):
    def __init__(
        self,
        bins: int = 32,
        refresh_every: int = 100,
        ema: float = 0.9,
        smooth: int = 1,
        gate: float = 6.0,
        gate_width: float = 1.0,
        floor: float = 0.05,
    ) -> None:
        if isinstance(bins, bool) or not isinstance(bins, int) or bins < 2:
            raise ValueError(f"timestep sampler 'infonoise': bins must be an integer >= 2, got {bins!r}")
        if isinstance(refresh_every, bool) or not isinstance(refresh_every, int) or refresh_every < 1:
            raise ValueError(f"timestep sampler 'infonoise': refresh_every must be an integer >= 1, got {refresh_every!r}")
        if isinstance(smooth, bool) or not isinstance(smooth, int) or smooth < 0:
            raise ValueError(f"timestep sampler 'infonoise': smooth must be an integer >= 0, got {smooth!r}")
        self.bins, self.refresh_every, self.smooth = bins, refresh_every, smooth
        self.ema = _check("ema", ema, 0.0, 1.0)
        self.gate = _check("gate", gate, -math.inf, math.inf)
        self.gate_width = _check("gate_width", gate_width, 1e-6, math.inf)
        self.floor = _check("floor", floor, 0.0, 1.0, closed_high=True)
        self.state: dict[str, torch.Tensor] = {}

    # ------------------------------------------------------------------ the grid
    def bind(self, alphas_cumprod: torch.Tensor, loss_weight: torch.Tensor) -> None:
        abar = alphas_cumprod.double()
        lam = torch.log(abar / (1 - abar))  # log-SNR per timestep, decreasing in t
        self.lam = lam
        lo, hi = float(lam.min()), float(lam.max())
        self.edges = torch.linspace(lo, hi, self.bins + 1, dtype=torch.float64)
        self.centers = (self.edges[:-1] + self.edges[1:]) / 2
        self.bin_of_t = torch.bucketize(lam, self.edges[1:-1])  # [T] in 0..bins-1
        # the log-SNR width each discrete timestep stands for (central differences)
        self.width = torch.gradient(lam)[0].abs()
        self.loss_weight = loss_weight.double()
        t_count = len(lam)
        if not self.state:
            self.state = {
                "sums": torch.zeros(self.bins, dtype=torch.float64),
                "counts": torch.zeros(self.bins, dtype=torch.float64),
                "profile": torch.full((self.bins,), math.nan, dtype=torch.float64),
                "probs": torch.full((t_count,), 1.0 / t_count, dtype=torch.float64),
                "history": torch.zeros(0, self.bins, dtype=torch.float64),
                "history_steps": torch.zeros(0, dtype=torch.float64),
            }

    # ------------------------------------------------------------------ drawing
    def resample(self, t: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        cdf = torch.cumsum(self.state["probs"], 0)
        drawn = torch.searchsorted(cdf, u.double() * cdf[-1], right=True)
        return drawn.clamp_max(len(cdf) - 1).to(t.dtype)

    # ------------------------------------------------------------------ adapting
    def statistics(self, t: torch.Tensor, losses: torch.Tensor) -> torch.Tensor:
        b = self.bin_of_t[t.long().cpu()]
        losses = losses.double().cpu()
        sums = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, b, losses)
        counts = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, b, torch.ones_like(losses, dtype=torch.float64))
        return torch.cat([sums, counts])

    def update(self, stats: torch.Tensor, step: int) -> None:
        self.state["sums"] += stats[: self.bins].double()
        self.state["counts"] += stats[self.bins :].double()
        if step % self.refresh_every == 0:
            self.refresh(step)

    def refresh(self, step: int) -> None:
        s = self.state
        seen = s["counts"] > 0
        mean = torch.where(seen, s["sums"] / s["counts"].clamp_min(1), s["profile"])
        old = s["profile"]
        profile = torch.where(old.isnan(), mean, self.ema * old + (1 - self.ema) * mean)
        if profile.isnan().all():
            return  # nothing seen yet
        profile = torch.where(profile.isnan(), profile[~profile.isnan()].mean(), profile)
        s["profile"] = profile
        s["sums"].zero_()
        s["counts"].zero_()
        target = self.smoothed(profile) * torch.sigmoid((self.gate - self.centers) / self.gate_width)
        per_t = target[self.bin_of_t] / self.loss_weight.clamp_min(1e-12) * self.width
        probs = per_t / per_t.sum()
        probs = (1 - self.floor) * probs + self.floor / len(probs)
        s["probs"] = probs
        density = self.bin_density(probs)
        s["history"] = torch.cat([s["history"], density[None]])
        s["history_steps"] = torch.cat([s["history_steps"], torch.tensor([float(step)], dtype=torch.float64)])

    def smoothed(self, profile: torch.Tensor) -> torch.Tensor:
        """Moving average over ``2 * smooth + 1`` bins, normalised at the ends."""
        if self.smooth == 0:
            return profile
        kernel = torch.ones(1, 1, 2 * self.smooth + 1, dtype=torch.float64)
        pad = self.smooth
        total = torch.nn.functional.conv1d(profile[None, None], kernel, padding=pad)[0, 0]
        count = torch.nn.functional.conv1d(torch.ones_like(profile)[None, None], kernel, padding=pad)[0, 0]
        return total / count

    def bin_density(self, probs: torch.Tensor) -> torch.Tensor:
        """The training distribution as a density over log-SNR, per bin (integrates to 1)."""
        mass = torch.zeros(self.bins, dtype=torch.float64).index_add_(0, self.bin_of_t, probs)
        return mass / (self.edges[1:] - self.edges[:-1])

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.clone() for k, v in self.state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.state or state) - set(state)
        if missing:
            raise ValueError(f"infonoise state lacks {sorted(missing)}")
        if len(state["sums"]) != self.bins:
            raise ValueError(f"infonoise state has {len(state['sums'])} bins, the recipe {self.bins}")
        self.state = {k: v.double().clone() for k, v in state.items()}
