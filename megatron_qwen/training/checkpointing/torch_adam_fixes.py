"""Fixes for megatron-core 0.16.1's distributed optimizer with torch's Adam.

Without apex/Transformer Engine megatron falls back to ``torch.optim.AdamW``, whose
per-parameter state has a ``step`` tensor. Two bugs then break resuming a
distributed-optimizer checkpoint (the fused optimizers on GPU clusters are unaffected):

1. ``_set_main_param_and_optimizer_states`` copies every key of the live state,
   ``step`` included, from the loaded tensors, which never contain ``step``
   (``KeyError: 'step'``).
2. ``load_state_dict`` assigns one shared ``step`` tensor to every parameter; torch's
   Adam increments it in place once per parameter, so bias correction runs ahead and
   resumed losses drift from the uninterrupted run.
"""

from __future__ import annotations

import functools

import torch
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

_PATCHED = False


def _skip_step(original):
    @functools.wraps(original)
    def set_states(self, model_param, tensors):
        if "step" in tensors or self.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8:
            return original(self, model_param, tensors)
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        step = state.pop("step", None)
        try:
            return original(self, model_param, tensors)
        finally:
            if step is not None:
                state["step"] = step

    return set_states


def install() -> None:
    """Patches the loader once per process (idempotent)."""
    global _PATCHED
    if not _PATCHED:
        DistributedOptimizer._set_main_param_and_optimizer_states = _skip_step(
            DistributedOptimizer._set_main_param_and_optimizer_states)
        _PATCHED = True


def unshare_step_tensors(optimizer) -> None:
    """Gives every parameter its own ``step`` tensor after a load (see bug 2)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if not isinstance(inner, torch.optim.Optimizer):
            continue
        for state in inner.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
