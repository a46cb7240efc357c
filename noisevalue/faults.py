"""Named points where a test kills the process, as ``kill -9`` or a preemption would.

``NOISEVALUE_KILL_AT=NAME[:N]`` in the environment makes the N-th arrival (default the
first) at :func:`point` ``NAME`` send SIGKILL to this process: no ``finally`` block, no
flush, exactly what a lost machine leaves on disk. Unset, a point costs one dictionary
lookup. The points:

=========================  =================================================================
``checkpoint.written``     a checkpoint's files are written in its temporary folder, not published
``checkpoint.published``   the checkpoint is published; pruning, logging and evaluation not done
``checkpoint.retiring``    an old checkpoint is renamed to its hidden name, not yet deleted
``evaluate.grid``          an evaluation's sample grid is written, its metrics not yet
``train.step``             a training step is taken (between checkpoints, mid log window)
=========================  =================================================================
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "NOISEVALUE_KILL_AT"
POINTS = ("checkpoint.written", "checkpoint.published", "checkpoint.retiring", "evaluate.grid", "train.step")
_arrivals: Counter[str] = Counter()


def point(name: str) -> None:
    """Arrive at point ``name``; killed here if the environment says so."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    target, _, count = spec.partition(":")
    if target != name:
        return
    _arrivals[name] += 1
    if _arrivals[name] == int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)
