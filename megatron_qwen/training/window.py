"""Training statistics accumulated between two log records, synced only when logged."""

from __future__ import annotations

import time
from typing import Dict, Optional, Tuple

import torch

from megatron_qwen.training.step import Metrics, global_means


class LogWindow:
    """A stage's metrics, the grad norm and skipped steps since the last log record.

    The metrics stay on the device as running ``[sum, count]`` pairs (no host sync per step)
    and are reduced over data-parallel ranks once, when logged: a logged value is the mean
    over the window's steps, weighted by each metric's count (tokens for the LM loss, pairs
    for DPO), as Megatron-LM logs the interval mean.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.metrics: Optional[Metrics] = None  # on the last PP stage only
        self.grad_norm, self.skipped, self.iters = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, metrics: Optional[Metrics], grad_norm: float, applied: bool) -> None:
        """Adds one step (``metrics``: this rank's ``[sum, count]`` per name, None off the last stage).

        A skipped step's metrics are left out (they may be NaN), as Megatron-LM does; a window
        of skipped steps only has none.
        """
        if metrics is not None and applied:
            self.metrics = metrics if self.metrics is None else {k: self.metrics[k] + v for k, v in metrics.items()}
        self.grad_norm = grad_norm  # the latest step's, as megatron logs it
        self.skipped += 0 if applied else 1
        self.iters += 1

    def collect(self) -> Tuple[Optional[Dict[str, float]], float, int, int, float]:
        """(metric means, last grad norm, skipped steps, steps, seconds) of the window; resets it.

        Collective on the last pipeline stage (the DP x CP all-reduce); the means are None
        when every step of the window was skipped.
        """
        means = global_means(self.metrics)
        out = (means, self.grad_norm, self.skipped, self.iters, time.perf_counter() - self.start)
        self._reset()
        return out
