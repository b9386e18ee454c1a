"""Training statistics accumulated between two log records, synced only when logged."""

from __future__ import annotations

import time
from typing import Optional, Tuple

import torch

from megatron_qwen.training.step import global_mean_loss


class LogWindow:
    """Loss, grad norm and skipped steps since the last log record.

    The loss stays on the device as a running ``[loss_sum, tokens]`` (no host sync per step)
    and is reduced over data-parallel ranks once, when logged: the logged loss is the
    token-weighted mean over the window's steps (Megatron-LM logs the interval mean too).
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._reset()

    def _reset(self) -> None:
        self.loss: Optional[torch.Tensor] = None  # [loss_sum, tokens] on the last PP stage
        self.grad_norm, self.skipped, self.iters = 0.0, 0, 0
        self.start = time.perf_counter()

    def add(self, loss: Optional[torch.Tensor], grad_norm: float, applied: bool) -> None:
        """Adds one step (``loss``: this rank's [loss_sum, tokens], None off the last stage).

        A skipped step's loss is left out (it may be NaN), as Megatron-LM does; a window of
        skipped steps only has no loss.
        """
        if loss is not None and applied:
            self.loss = loss if self.loss is None else self.loss + loss
        self.grad_norm = grad_norm  # the latest step's, as megatron logs it
        self.skipped += 0 if applied else 1
        self.iters += 1

    def collect(self) -> Tuple[Optional[float], float, int, int, float]:
        """(mean loss, last grad norm, skipped steps, steps, seconds) of the window; resets it.

        Collective on the last pipeline stage (the DP x CP loss all-reduce); the loss is None
        when every step of the window was skipped.
        """
        loss = global_mean_loss(self.loss)
        out = (loss, self.grad_norm, self.skipped, self.iters, time.perf_counter() - self.start)
        self._reset()
        return out
