"""Test driver: ``python -m megatron_qwen.train`` with a hang injected at the second step.

Rank 0 blocks in a receive that no rank ever sends (as if waiting on a peer that died);
rank 1 goes on into its step and blocks in the step's first collective, waiting for rank
0. Only tests run this module, so normal runs carry no injection hook.
"""

from __future__ import annotations

import sys

import torch

from megatron_qwen import train
from megatron_qwen.cli import run_hydra
from megatron_qwen.training import loop

HANG_AT_STEP = 2
_real_train_step = loop.train_step
_steps = 0


def _hanging_train_step(*args, **kwargs):
    global _steps
    _steps += 1
    if _steps == HANG_AT_STEP and torch.distributed.get_rank() == 0:
        torch.distributed.recv(torch.zeros(1), src=1)  # never sent: blocks until the watchdog fires
    return _real_train_step(*args, **kwargs)


if __name__ == "__main__":
    loop.train_step = _hanging_train_step
    sys.exit(run_hydra(train.main))
