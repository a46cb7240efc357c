"""Matching training stages across backbones by their training loss (paper appendix B.4).

A rater trained on one backbone's checkpoint at step ``s`` is applied to a larger backbone
from the point where that backbone's training loss has come down to the same level:

    level = L~_src(s)
    t*    = min { t : L~_tgt(t') <= level for every logged t' in [t, t + W] }

``L~`` is the logged training loss smoothed with a centred rolling mean of
``smoothing_window`` logged points; ``W`` (``stability_window``) is counted in logged points
too, and the whole window must lie inside the log: a match that cannot be confirmed for W
more points is no match. The run is then continued from the kept checkpoint nearest to t*.

Pure functions on lists of numbers; no torch, no files.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Centred rolling mean, as pandas' ``rolling(window, center=True, min_periods=1).mean()``.

    The value at index ``i`` is the mean of the points ``i - window // 2`` ...
    ``i + (window - 1) // 2`` that exist (an even window reaches one point further back than
    forward); at the ends the window is cut off and the mean taken over what remains.
    ``window=1`` returns the values unchanged.
    """
    if window < 1:
        raise ValueError(f"smoothing window must be >= 1, got {window}")
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    if n == 0:
        return []
    idx = np.arange(n)
    lo = np.clip(idx - window // 2, 0, n)
    hi = np.clip(idx + (window - 1) // 2 + 1, 0, n)  # exclusive
    csum = np.concatenate([[0.0], np.cumsum(x)])
    return ((csum[hi] - csum[lo]) / (hi - lo)).tolist()


def nearest_index(steps: Sequence[int], step: int) -> int:
    """The index of the entry of ``steps`` nearest to ``step``; on a tie the earlier step."""
    if not steps:
        raise ValueError("no steps to choose from")
    return min(range(len(steps)), key=lambda j: (abs(steps[j] - step), steps[j]))


def level_at(steps: Sequence[int], losses: Sequence[float], step: int, smoothing_window: int) -> tuple[int, float]:
    """(logged step, smoothed loss) at the logged step nearest to ``step`` (ties: the earlier).

    This is the source's loss level at the checkpoint its rater was trained on."""
    if not steps:
        raise ValueError("empty loss curve")
    i = nearest_index(steps, step)
    return int(steps[i]), smooth(losses, smoothing_window)[i]


def matched_index(smoothed: Sequence[float], level: float, stability_window: int) -> int | None:
    """The first index ``i`` with ``smoothed[j] <= level`` for every ``j`` in
    ``[i, i + stability_window]``, all inside the sequence; None if there is none."""
    if stability_window < 0:
        raise ValueError(f"stability window must be >= 0, got {stability_window}")
    need = stability_window + 1
    run = 0  # consecutive points at or below the level, counted backwards from the end
    best: int | None = None
    for i in range(len(smoothed) - 1, -1, -1):
        run = run + 1 if smoothed[i] <= level else 0
        if run >= need:
            best = i
    return best


def matched_step(
    steps: Sequence[int], losses: Sequence[float], level: float, smoothing_window: int, stability_window: int
) -> int | None:
    """The first logged step whose smoothed loss stays ``<= level`` for ``stability_window``
    more logged points (paper eq. 10); None when the curve never does so within its log."""
    if len(steps) != len(losses):
        raise ValueError(f"{len(steps)} steps but {len(losses)} losses")
    i = matched_index(smooth(losses, smoothing_window), level, stability_window)
    return None if i is None else int(steps[i])


def nearest_checkpoint(checkpoint_steps: Sequence[int], step: int) -> int:
    """The checkpoint step nearest to ``step``; on a tie the earlier one (the checkpoint whose
    loss is still at or above the level rather than past it)."""
    if not checkpoint_steps:
        raise ValueError("no checkpoints to choose from")
    return int(checkpoint_steps[nearest_index(checkpoint_steps, step)])
