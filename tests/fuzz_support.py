"""Shared pieces of the fuzz tests: hypothesis settings, in-process CLI calls, the clean-failure contract.

Every CLI promises the same thing on bad input: exit code 2, exactly one ``error: ...``
line on stderr, no traceback, and nothing left where its output would have gone. The
fuzz tests call the CLIs' ``main(argv)`` in-process (a subprocess per case would cost
seconds on 2 cores) and check that contract on every generated case.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
from pathlib import Path
from typing import Callable, List, Sequence, Set, Tuple

from hypothesis import HealthCheck, settings

# NOTE: derandomize makes CI runs reproducible (the same cases every run, chosen from a hash
# of the test); there is no example database, so nothing is written into the checkout.
FUZZ_SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                     suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                            HealthCheck.large_base_example, HealthCheck.filter_too_much])


def fuzz(max_examples: int):
    """Hypothesis settings of a fuzz test: fixed cases, no deadline, ``max_examples`` of them."""
    return settings(max_examples=max_examples, **FUZZ_SETTINGS)


def call_main(main: Callable[[Sequence[str]], int], argv: Sequence[str]) -> Tuple[int, str, str]:
    """Runs a CLI's ``main(argv)`` in this process; returns (exit code, stdout, stderr).

    An exception escaping ``main`` is a traceback the user would have seen: it propagates.
    The root logger gets its handlers and level back: Hydra's job logging adds a file handler
    for ``<run_dir>/train.log``, which would fail every later log call of this pytest process
    once the case's directory is gone.
    """
    out, err = io.StringIO(), io.StringIO()
    handlers, level = logging.root.handlers[:], logging.root.level
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(argv))
            except SystemExit as exit_:  # argparse's usage errors
                code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        for handler in set(logging.root.handlers) - set(handlers):
            handler.close()
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    return code, out.getvalue(), err.getvalue()


def outcome(code: int, stderr: str) -> str:
    """A short label of a case's outcome for ``hypothesis.event`` (paths and numbers blanked)."""
    text = re.sub(r"\S*/\S*|\d+", "_", stderr.strip().splitlines()[-1] if stderr.strip() else "")[:70]
    return f"exit {code}: " + text.encode("utf-8", "replace").decode("utf-8")


def tree(root: Path) -> Set[str]:
    """Every path under ``root`` (files and directories), relative to it."""
    return {str(p.relative_to(root)) for p in Path(root).rglob("*")}


def assert_clean_failure(code: int, stderr: str, leftovers: List[str], case: str = "") -> None:
    """Exit code 2, one ``error:`` line, no traceback, and no output left behind."""
    lines = stderr.strip().splitlines()
    assert code == 2, f"{case}: exit code {code}, stderr: {stderr[-2000:]}"
    assert "Traceback" not in stderr, f"{case}: traceback in stderr: {stderr[-3000:]}"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1 and len(lines) == 1, f"{case}: expected one error line, got {lines[-10:]}"
    assert not leftovers, f"{case}: left behind {sorted(leftovers)}"

