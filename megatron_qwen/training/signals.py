"""Graceful stop on SIGTERM or a configured signal (e.g. SLURM's USR1 before the time limit)."""

from __future__ import annotations

import signal

import torch

_received: list[int] = []


def _handler(signum, frame) -> None:
    _received.append(signum)


def install(exit_signal: str) -> None:
    """Records SIGTERM and ``exit_signal`` instead of dying; the loop polls :func:`should_stop`."""
    for name in {"SIGTERM", exit_signal}:
        signal.signal(getattr(signal, name), _handler)


def should_stop(device: torch.device) -> bool:
    """True on every rank as soon as any rank received a stop signal (collective)."""
    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
    return bool(flag.item())
