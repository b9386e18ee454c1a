"""Python's garbage collector run at fixed steps on every rank (Megatron-LM's ``--manual-gc``).

Automatic collection starts whenever allocation counters cross a threshold, at a different
moment on each rank; a rank paused in a full collection stalls all others at the next
collective. With ``train.manual_gc_interval`` > 0 automatic collection is off and every rank
collects after the same steps.
"""

from __future__ import annotations

import gc


class ManualGC:
    """Disables automatic GC for the duration of training when ``interval`` > 0."""

    def __init__(self, interval: int) -> None:
        self.interval = interval
        if interval > 0:
            gc.disable()
            gc.collect()  # start from a clean heap, like Megatron-LM

    def step(self, iteration: int) -> None:
        """Collects after every ``interval``-th iteration."""
        if self.interval > 0 and iteration % self.interval == 0:
            gc.collect()

    def close(self) -> None:
        """Gives the process its automatic GC back (e.g. for the next sweep point)."""
        if self.interval > 0:
            gc.enable()
