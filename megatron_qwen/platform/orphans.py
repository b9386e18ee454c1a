"""Child processes that die with the trainer (Linux).

megatron's checkpoint writer forks worker processes for every save (and, with
``checkpoint.async_save``, a background writer), and its write-results queue lives in a
``multiprocessing`` manager process started with the spawn context. None of them notices
when the trainer is killed (``kill -9``, an OOM kill): under torchrun or a plain shell they
stay alive, each holding hundreds of MB. Under SLURM the job's cgroup reaps them; elsewhere
nothing does. The kernel can: ``prctl(PR_SET_PDEATHSIG, SIGKILL)`` in a child makes its
parent's death kill it too.

NOTE: the signal follows the *thread* that forked the child; every fork here happens on
the forking process's main thread (the training loop, megatron's writer).
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
import sys
from multiprocessing.managers import SyncManager

_PR_SET_PDEATHSIG = 1
_forking_pid = [0]  # set in the parent right before each fork, read in the child
_installed = [False]


def die_with_parent(parent_pid: int) -> None:
    """Makes the kernel SIGKILL this process when its parent exits; exits at once if the
    parent already has (it may die between the fork and this call)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def _before_fork() -> None:
    _forking_pid[0] = os.getpid()


def _after_fork_in_child() -> None:
    die_with_parent(_forking_pid[0])


def install() -> None:
    """Every process forked from now on (by this process or, recursively, its forked
    children) dies with its parent. Spawned processes run no fork hooks: start them with
    :func:`spawned_manager` or an initializer calling :func:`die_with_parent`."""
    if _installed[0]:
        return
    _installed[0] = True
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)


def spawned_manager() -> SyncManager:
    """A started spawn-context ``multiprocessing`` manager that dies with this process."""
    manager = SyncManager(ctx=multiprocessing.get_context("spawn"))
    manager.start(initializer=die_with_parent, initargs=(os.getpid(),))
    return manager
