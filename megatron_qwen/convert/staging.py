"""Output directories that appear complete or not at all.

Every converter writes into a temporary directory next to its output and renames it
into place only after the last byte is written, so a failure (bad input found late,
disk full, Ctrl-C) never leaves a half-written model behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from megatron_qwen.errors import UserError


class ConvertError(UserError, ValueError):
    """Input a conversion cannot use; the message names the path and what is wrong."""


def check_output_dir(out: Path) -> None:
    """Refuses an existing file or non-empty directory as the output."""
    if out.is_file():
        raise ConvertError(f"output {out} is an existing file; choose a new directory")
    if out.is_dir() and any(out.iterdir()):
        raise ConvertError(f"output directory {out} exists and is not empty; remove it or choose another")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yields a fresh temporary directory beside ``out``; renames it to ``out`` on success.

    On any exception the temporary directory is removed and ``out`` is left as it was.
    """
    out = Path(out).absolute()
    check_output_dir(out)
    created = [p for p in out.parents if not p.exists()]  # deepest first; removed again on failure
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp's 0700 would make the result private
    try:
        yield tmp
        check_output_dir(out)  # someone may have written there meanwhile
        if out.is_dir():
            out.rmdir()
        os.replace(tmp, out)
        created = []
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        for directory in created:
            with contextlib.suppress(OSError):  # not empty: someone else writes there too
                directory.rmdir()
