"""Fault injection for tests of the failure handling (``debug.*``; empty in real runs).

* ``debug.nan_grad_at_steps``: at those steps the gradient of one parameter on global
  rank 0 becomes NaN before megatron accumulates it. The other ranks learn of it only the
  way they would of a real fault: through the gradient reduction and the grad norm.
* ``debug.spike_batch_at_steps``: at those steps every micro-batch's tokens are one
  repeated token and its labels another one, a pattern no training data has: the loss jumps.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from megatron_qwen.config.schema import DebugConfig

_SPIKE_TOKEN, _SPIKE_LABEL = 7, 3  # any ids below the vocabulary size


class FaultInjector:
    """Arms the configured faults for one step at a time (:meth:`arm` before each step)."""

    def __init__(self, cfg: DebugConfig, model: List[torch.nn.Module]) -> None:
        self.step = 0
        self.nan_steps, self.spike_steps = set(cfg.nan_grad_at_steps), set(cfg.spike_batch_at_steps)
        if self.nan_steps and torch.distributed.get_rank() == 0:
            param = next(p for p in model[0].parameters() if p.requires_grad)
            param.register_hook(self._poison)  # runs before the grad reaches megatron's buffer

    def arm(self, step: int) -> None:
        self.step = step

    def _poison(self, grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("nan")) if self.step in self.nan_steps else grad

    def wrap(self, iterators: List) -> List:
        """The data iterators, with spike batches substituted at the configured steps."""
        return [_SpikeBatches(it, self) for it in iterators] if self.spike_steps else iterators


class _SpikeBatches:
    def __init__(self, iterator, injector: FaultInjector) -> None:
        self.iterator, self.injector = iterator, injector

    def __iter__(self):
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        batch = next(self.iterator)
        if self.injector.step in self.injector.spike_steps:
            batch = {**batch, "tokens": torch.full_like(batch["tokens"], _SPIKE_TOKEN),
                     "labels": torch.full_like(batch["labels"], _SPIKE_LABEL)}
        return batch
