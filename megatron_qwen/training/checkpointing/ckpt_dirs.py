"""Checkpoint directories of a run: which one to resume from, publishing and pruning.

A checkpoint directory is trusted only when it is complete (:mod:`manifest`): resuming
takes the newest complete one and says why it skipped any newer one; a run directory
whose checkpoints are all damaged stops with an error instead of training from scratch
over them; pruning keeps ``keep_last`` complete checkpoints, so it never removes the only
complete one.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

import torch

from megatron_qwen.errors import UserError
from megatron_qwen.training.checkpointing import manifest

log = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
_ITER_DIR = re.compile(r"iter_(\d{7})")
_TMP_DIR = re.compile(r"iter_(\d{7})\.tmp")


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the path and the fix."""


def iteration_dir(root: Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def iteration_of(path: Path) -> int:
    return int(_ITER_DIR.fullmatch(path.name).group(1))


def iteration_dirs(root: Path) -> List[Path]:
    """The ``iter_XXXXXXX`` directories under ``root``, newest first (``*.tmp`` excluded)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _ITER_DIR.fullmatch(p.name)]
    return sorted(found, key=iteration_of, reverse=True)


def find_latest(root: Path) -> Optional[Path]:
    """The newest checkpoint under ``root`` whose files are all present with the right sizes
    (no checksums: one process, for tools); None if there is none."""
    for path in iteration_dirs(root):
        problem = manifest.check_sizes(path)
        if problem is None:
            return path
        log.warning("skipping %s: %s", path.name, problem)
    return None


def choose_resume(root: Path) -> Optional[Path]:
    """Collective: the newest complete (checksum-verified) checkpoint under ``root``.

    None when ``root`` has no checkpoint directory at all. Raises CheckpointError when it
    has some but none is complete: starting from scratch would train over them.
    """
    candidates, skipped = iteration_dirs(root), []
    for path in candidates:
        problem = manifest.verify(path)
        if problem is None:
            _log_choice(path, skipped)
            return path
        skipped.append(f"{path.name}: {problem}")
    if candidates:
        raise CheckpointError(
            f"{root} has checkpoints but none is complete ({'; '.join(skipped)}); nothing was changed. "
            f"To continue this run, restore a complete iter_XXXXXXX into {root}; to start over from another "
            "run's weights, use a new run_dir=... with checkpoint.load=<its checkpoints dir>; to start from "
            "scratch, use a new run_dir=...")
    return None


def resolve_load(path: Path) -> Path:
    """Collective: the complete checkpoint that ``checkpoint.load=path`` names: the newest of
    a run's checkpoints (``path`` = a run directory or its ``checkpoints/``) or ``path`` itself."""
    if not path.exists():
        raise CheckpointError(f"checkpoint.load={path} does not exist; point it at a run's checkpoints/ "
                              "directory, an iter_XXXXXXX directory or a converted checkpoint")
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if iteration_dirs(path):
        return choose_resume(path)
    problem = manifest.verify(path)
    if problem is not None:
        raise CheckpointError(f"checkpoint.load={path} is not a complete checkpoint: {problem}; point it at a "
                              "run's checkpoints/ directory, an iter_XXXXXXX directory or a converted checkpoint")
    return path


def _log_choice(path: Path, skipped: List[str]) -> None:
    if torch.distributed.get_rank() != 0:
        return
    for reason in skipped:
        log.warning("skipping newer checkpoint %s", reason)
    marker = path.parent / LATEST_FILE
    named = marker.read_text().strip() if marker.is_file() else ""
    if named.isdigit() and int(named) > iteration_of(path) and not iteration_dir(path.parent, int(named)).is_dir():
        log.warning("%s names iteration %s, whose directory is missing", marker, named)
    if manifest.read_manifest(path) is None:
        log.info("%s has no %s (written before checksums were recorded): checked metadata.json, common.pt "
                 "and the shard files named by .metadata (sizes only)", path, manifest.MANIFEST_FILE)
    log.info("using %s (the newest complete checkpoint there)", path)


def publish(tmp: Path, iteration: int) -> Path:
    """Rank 0: ``iter_XXXXXXX.tmp`` -> ``iter_XXXXXXX``, then the ``latest`` marker, atomically."""
    final = iteration_dir(tmp.parent, iteration)
    shutil.rmtree(final, ignore_errors=True)  # the same iteration saved again (after a rollback)
    os.replace(tmp, final)
    marker_tmp = tmp.parent / (LATEST_FILE + ".tmp")
    marker_tmp.write_text(str(iteration))
    os.replace(marker_tmp, tmp.parent / LATEST_FILE)
    return final


def prune(root: Path, keep_last: int, below: int) -> None:
    """Keeps the newest ``keep_last`` complete checkpoints (all if ``keep_last`` <= 0) and any
    newer incomplete one; removes older directories and ``*.tmp`` leftovers of iterations
    before ``below`` (a save in flight may own a newer ``*.tmp``)."""
    for tmp in Path(root).glob("iter_*.tmp"):
        match = _TMP_DIR.fullmatch(tmp.name)
        if match and int(match.group(1)) < below:
            shutil.rmtree(tmp, ignore_errors=True)
    if keep_last <= 0:
        return
    dirs = iteration_dirs(root)
    complete = [p for p in dirs if manifest.check_sizes(p) is None][:keep_last]
    if len(complete) < keep_last:
        return
    oldest_kept = iteration_of(complete[-1])
    for path in dirs:
        if iteration_of(path) < oldest_kept:
            shutil.rmtree(path, ignore_errors=True)
