"""Build-once cache directories shared by ranks, jobs and concurrent test runs.

A cached artifact is a directory that exists only once complete: it is built under a
temporary name and renamed into place while holding an exclusive ``flock`` on a sibling
lock file, so concurrent builders wait for the first one instead of racing. (On network
file systems without flock the rename still keeps readers from seeing partial output.)
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

CACHE_ENV = "MEGATRON_QWEN_CACHE"


def cache_root(configured: Optional[str] = None) -> Path:
    """``data.cache_dir`` if set, else ``$MEGATRON_QWEN_CACHE``, else ``~/.cache/megatron_qwen``."""
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "megatron_qwen"))


def content_key(description: dict) -> str:
    """Short stable hash of a JSON-serializable description of what gets built."""
    return hashlib.sha256(json.dumps(description, sort_keys=True).encode()).hexdigest()[:16]


def build_once(directory: Path, build: Callable[[Path], None]) -> Path:
    """Returns ``directory``, first calling ``build(tmp_dir)`` to fill it if it does not exist."""
    if directory.is_dir():
        return directory
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{directory}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not directory.is_dir():  # another process may have finished while we waited
            tmp = Path(f"{directory}.tmp{os.getpid()}")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
            try:
                build(tmp)
                os.rename(tmp, directory)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return directory
