"""Activation checkpointing that is safe inside ``torch.func.functional_call``.

``torch.utils.checkpoint`` recomputes a block during the backward pass, after
``functional_call`` has put the module's own parameters back: a plain checkpointed block
would recompute with the wrong weights. :func:`checkpointed_call` passes the parameter
tensors in use at forward time (the substituted ones inside ``functional_call``) into the
checkpointed function and re-enters ``functional_call`` with them, so the recomputation
sees exactly what the forward saw.

Non-reentrant checkpointing supports reverse-over-reverse (double backward), which the
meta-gradient engines' ``hvp="double_backward"`` paths use; ``torch.func`` transforms
(``grad``, ``jvp``) cannot run through its saved-tensor hooks.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint


def checkpointed_call(module: nn.Module, *inputs: Any, enabled: bool = True, **kwargs: Any) -> Any:
    """``module(*inputs, **kwargs)``, with its activations recomputed in the backward pass
    when ``enabled`` and gradients are being recorded."""
    if not (enabled and torch.is_grad_enabled()):
        return module(*inputs, **kwargs)
    names = [name for name, _ in module.named_parameters()]
    tensors = [p for _, p in module.named_parameters()]
    n = len(inputs)

    def run(*args: Any) -> Any:
        return functional_call(module, dict(zip(names, args[n:], strict=True)), args[:n], kwargs)

    return checkpoint(run, *inputs, *tensors, use_reentrant=False)
