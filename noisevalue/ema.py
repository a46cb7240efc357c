"""Exponential moving average of model weights, keyed by the *unwrapped* module's names.

Keys never carry DDP's ``module.`` or torch.compile's ``_orig_mod.`` prefixes, because the
average is always taken over :func:`unwrap` of the training module.
"""

from __future__ import annotations

import torch
from torch import nn


def unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod  # type: ignore[assignment]
        elif isinstance(module, nn.parallel.DistributedDataParallel):
            module = module.module
        else:
            return module


class EMA:
    """``shadow = decay * shadow + (1 - decay) * weights`` after every optimizer step.

    With ``warmup`` the decay used at update ``n`` is ``min(decay, (1 + n) / (10 + n))``, so a
    short run's average is not dominated by its initial weights (with a constant 0.999, 22%
    of the average after 1,500 steps is still the initialisation). DiT uses no warm-up.
    """

    def __init__(self, model: nn.Module, decay: float, warmup: bool = False) -> None:
        self.decay, self.warmup = decay, warmup
        self.shadow = {k: v.detach().clone() for k, v in unwrap(model).state_dict().items()}

    def decay_at(self, step: int) -> float:
        return min(self.decay, (1 + step) / (10 + step)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module, step: int = 0, keep: torch.Tensor | None = None) -> None:
        """``step``: optimizer steps taken before this one (for the warm-up). ``keep``: a 0-d
        tensor on the weights' device, 1 to update and 0 to leave the average as it is (a
        skipped step), read without waiting for the device."""
        current = unwrap(model).state_dict()
        keys = [k for k, v in self.shadow.items() if v.is_floating_point()]
        weight: float | torch.Tensor = 1.0 - self.decay_at(step)
        if keep is not None:
            weight = keep.to(torch.float32) * weight
        torch._foreach_lerp_([self.shadow[k] for k in keys], [current[k].detach() for k in keys], weight)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        for k, v in state.items():
            self.shadow[k].copy_(v)
