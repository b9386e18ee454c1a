"""How the command lines report bad input: one ``error: ...`` line on stderr and exit code 2.

``tools/`` build their parsers from :class:`ArgumentParser`; ``python -m megatron_qwen.train``
runs its Hydra main through :func:`run_hydra`, so that a bad override (an unknown key, a
value of the wrong type, a missing config group option, broken override syntax) ends the
same way as a bad value caught by ``config.validate``, instead of Hydra's multi-line report.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, Iterator, NoReturn, Optional, Sequence

from hydra.errors import HydraException
from omegaconf.errors import OmegaConfBaseException

USER_ERROR_EXIT_CODE = 2


def one_line(err: BaseException) -> str:
    """The error's message (and its cause's, which Hydra keeps the detail in) on one line."""
    text = str(err)
    cause = err.__cause__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    return " ".join(text.split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one ``error: ...`` line and exit code 2, like every other bad input
    (argparse's own prints the usage block first)."""

    def error(self, message: str) -> NoReturn:
        self.exit(USER_ERROR_EXIT_CODE, f"error: {self.prog}: {message}; see {self.prog} --help\n")


@contextlib.contextmanager
def _hydra_argv(argv: Optional[Sequence[str]]) -> Iterator[None]:
    saved_argv, saved_env = sys.argv, os.environ.get("HYDRA_FULL_ERROR")
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # Hydra's main reads its overrides from sys.argv
    os.environ["HYDRA_FULL_ERROR"] = "1"  # raise instead of printing a report and exiting 1
    try:
        yield
    finally:
        sys.argv = saved_argv
        if saved_env is None:
            os.environ.pop("HYDRA_FULL_ERROR", None)
        else:
            os.environ["HYDRA_FULL_ERROR"] = saved_env


def run_hydra(main: Callable[[], None], argv: Optional[Sequence[str]] = None) -> int:
    """Runs a ``@hydra.main`` function on ``argv`` (default: the process's) and returns the exit code.

    Errors Hydra raises while composing the config become one ``error:`` line and exit code 2;
    the task function's own exit codes pass through; anything else propagates with its traceback.
    """
    try:
        with _hydra_argv(argv):
            main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except (HydraException, OmegaConfBaseException) as err:
        print(f"error: {one_line(err)}", file=sys.stderr)
        return USER_ERROR_EXIT_CODE
    return 0
