"""Graceful stop on SIGTERM or a configured signal (e.g. SLURM's USR1 before the time limit; submitit's
USR2 under the sweep launchers).

A handler only records the signal (installed by :mod:`megatron_qwen.train` before the model
is built, so a signal during start-up is not fatal); the loop polls :func:`should_stop`
collectively before the first step and every ``train.stop_check_interval`` steps (each
poll is a tiny all-reduce and one host sync), so all ranks stop after the same step, save
one checkpoint together and leave. :mod:`megatron_qwen.train` then exits with :data:`RESUMABLE_EXIT_CODE`, on
which the SLURM templates requeue the job (the requeued job resumes from that
checkpoint). The requeue is the template's job, not the trainer's: only after every task
has exited is the checkpoint known to be complete and the job safe to requeue.
"""

from __future__ import annotations

import os
import signal
from typing import Optional

import torch

from megatron_qwen.platform import collectives

# sysexits.h EX_TEMPFAIL ("temporary failure, try again later"): distinct from crashes (1),
# Hydra/config errors (2) and signal deaths (128 + n).
RESUMABLE_EXIT_CODE = 75

_received: list[int] = []
_stop_agreed = False  # should_stop() returned True: every rank saw the same answer


def _handler(signum, frame) -> None:
    if not _received:  # say so at once: the loop acts only at its next stop check (a step may take minutes)
        os.write(2, f"received {signal.Signals(signum).name}: saving and stopping at the next stop check "
                    f"(train.stop_check_interval)\n".encode())
    _received.append(signum)


def received_here() -> bool:
    """Whether this process received a stop signal (no collective: the others may not have)."""
    return bool(_received)


def submitit_signal() -> Optional[str]:
    """The signal submitit sends before a job's time limit (``SIGUSR2``, or ``SUBMITIT_PREEMPT_SIGNAL``)
    when this process is a submitit task (hydra-submitit-launcher's sweeps), else None."""
    if not os.environ.get("SUBMITIT_EXECUTOR"):  # exported by submitit's batch script
        return None
    from submitit import JobEnvironment

    return "SIG" + JobEnvironment.USR_SIG


def install(exit_signal: str) -> None:
    """Records SIGTERM, ``exit_signal`` and submitit's time-limit signal instead of dying; the loop
    polls :func:`should_stop`.

    NOTE: under submitit this replaces the handlers submitit installed before calling the task
    (on SIGTERM and its time-limit signal): submitit's would requeue from rank 0 alone, mid-step,
    without a checkpoint (the launcher's ``checkpoint()`` resubmits the same call), and calls
    ``scontrol``, which the container lacks. The trainers save together and exit with
    :data:`RESUMABLE_EXIT_CODE` instead, on which the batch script requeues (slurm/env.sh).
    """
    for name in {"SIGTERM", exit_signal, submitit_signal()} - {None}:
        signal.signal(getattr(signal, name), _handler)


def should_stop(device: torch.device) -> bool:
    """True on every rank as soon as any rank received a stop signal (collective)."""
    global _stop_agreed
    flag = torch.tensor([1.0 if _received else 0.0], device=device)
    collectives.all_reduce(flag, op=collectives.ReduceOp.MAX)
    _stop_agreed = bool(flag.item())
    return _stop_agreed


def stopped_by_signal() -> bool:
    """Whether :func:`should_stop` told the loop to stop (the same answer on every rank)."""
    return _stop_agreed
