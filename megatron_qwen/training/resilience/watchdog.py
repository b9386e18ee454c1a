"""Hang watchdog: a rank that completes no training step in time dumps its stacks and exits.

A collective that never completes (a dead NIC, one rank stuck in storage I/O, mismatched
collectives after a bug) would otherwise hold the whole allocation until the wall-clock
limit. Every rank runs its own watchdog on ``faulthandler``'s timer: when no heartbeat
comes within the allowance, it writes the Python stacks of all its threads to
``<run_dir>/hang/rank_<r>.txt`` (faulthandler's timer is a C thread that needs no GIL, so
it fires even when the main thread is stuck in C code). ``EXIT_GRACE_S`` later the process
ends with exit code 1 (``os._exit``, no cleanup: the process is stuck); the launcher
(torchrun, srun) then ends the job. NOTE: the grace matters: the ranks blocked in the same
collective reach their own timeout moments later, and a rank that exited at once would
break their wait (gloo and NCCL report the lost peer) before they dumped where they were.

Allowances (``train.*``, ``null`` turns the watchdog off):

- ``hang_startup_timeout_s`` (default 2 h) from trainer start to the first completed step:
  model build, checkpoint load, dataset index building and the first step;
- ``hang_timeout_s`` (default 30 min) between two completed steps, which includes any
  evaluation and checkpoint save in between: set it above the slowest of those.

Both are generous for CPU runs; a debugger paused for longer than the allowance kills the
process (pass ``train.hang_timeout_s=null`` when debugging).
"""

from __future__ import annotations

import atexit
import faulthandler
import os
import sys
import threading
import time
from pathlib import Path
from typing import IO, Optional

from megatron_qwen.config.schema import Config

HANG_DIR = "hang"
EXIT_GRACE_S = 10.0  # between the dump and the exit: the other ranks reach their timeout meanwhile


class HangWatchdog:
    """One rank's watchdog; :meth:`beat` after every completed step, :meth:`stop` at the end.

    Without timeouts it is disarmed and does nothing (e.g. a Trainer built by a test).
    """

    def __init__(self, run_dir: Path, rank: int, timeout_s: Optional[float], startup_timeout_s: Optional[float]):
        self.timeout_s, self.path = timeout_s, Path(run_dir) / HANG_DIR / f"rank_{rank}.txt"
        self.file: Optional[IO[str]] = None
        self.killer: Optional[threading.Timer] = None
        if timeout_s is None and startup_timeout_s is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Appending keeps the stacks of an earlier hang of this run; stop() cuts back to it.
        self.file = open(self.path, "a")
        self.start_size = self.file.tell()
        self.file.write(f"rank {rank}: hang watchdog armed at {_now()} (allowed: {startup_timeout_s} s to the first "
                        f"completed step, {timeout_s} s between steps); stacks of every thread when no step "
                        "completed in time:\n")
        self.file.flush()
        atexit.register(self.stop)  # a crash or a normal exit leaves no empty file behind
        self._arm(startup_timeout_s)

    def __enter__(self) -> "HangWatchdog":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()  # also when start-up fails: bad input must leave no hang/ directory behind

    def _arm(self, seconds: Optional[float]) -> None:
        faulthandler.cancel_dump_traceback_later()
        if self.killer is not None:
            self.killer.cancel()
            self.killer = None
        if seconds is not None:
            faulthandler.dump_traceback_later(seconds, exit=False, file=self.file)
            self.killer = threading.Timer(seconds + EXIT_GRACE_S, _exit_hung)
            self.killer.daemon = True
            self.killer.start()

    def beat(self) -> None:
        """A training step completed: the next one has ``hang_timeout_s`` seconds."""
        if self.file is not None:
            self._arm(self.timeout_s)

    def stop(self) -> None:
        """Disarms and removes this run's (empty) dump file and, if empty, the ``hang/`` directory."""
        if self.file is None:
            return
        self._arm(None)
        self.file.truncate(self.start_size)
        self.file.close()
        self.file = None
        if self.path.stat().st_size == 0:
            self.path.unlink()
        try:
            self.path.parent.rmdir()
        except OSError:  # other ranks' files, or an earlier hang's stacks
            pass


def _exit_hung() -> None:
    sys.stderr.write("hang watchdog: no training step completed in time; stacks in the run directory's hang/\n")
    sys.stderr.flush()
    os._exit(1)


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %Z")


def start(cfg: Config, rank: int) -> HangWatchdog:
    """The watchdog of ``rank`` for a run of ``cfg``, armed with the startup allowance; a context
    manager that stops it on leaving."""
    return HangWatchdog(Path(cfg.run_dir), rank, cfg.train.hang_timeout_s, cfg.train.hang_startup_timeout_s)

