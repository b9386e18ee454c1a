"""What a complete checkpoint holds: per-file sizes and CRC32 checksums (``manifest.json``).

The manifest is written into ``iter_XXXXXXX.tmp`` after every rank finished writing and
before the directory is renamed, so a checkpoint directory without one was either written
before manifests existed or never finished. Checksumming is split over all ranks (each
reads a disjoint, size-balanced share of the files): a 72B checkpoint is about 1 TB, far
too much for one reader.

Two checks: :func:`check_sizes` (one process, no file contents read; tools use it) and
:func:`verify` (collective; sizes, then every checksum, read in parallel).
"""

from __future__ import annotations

import json
import logging
import zlib
from pathlib import Path
from typing import Dict, List, Optional

import torch

from megatron_qwen.platform import collectives

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 << 20  # bytes per read while checksumming


def crc32_file(path: Path) -> int:
    """CRC32 of a file, read in chunks (zlib runs at about 1 GB/s per core)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _list_files(directory: Path) -> Dict[str, int]:
    """Relative path -> size of every regular file under ``directory`` but the manifest."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*") if p.is_file()}
    files.pop(MANIFEST_FILE, None)
    return dict(sorted(files.items()))


def _share(sizes: Dict[str, int], rank: int, world: int) -> List[str]:
    """This rank's files: largest first, each to the least-loaded rank (same on every rank)."""
    load, mine = [0] * world, []
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        owner = min(range(world), key=lambda r: (load[r], r))
        load[owner] += sizes[name]
        if owner == rank:
            mine.append(name)
    return mine


def _from_rank0(value):
    """rank 0's ``value`` on every rank (every rank must read the same listing and verdict)."""
    return collectives.broadcast_object(value if torch.distributed.get_rank() == 0 else None, src=0)


def write_manifest(directory: Path) -> None:
    """Collective: checksums ``directory``'s files in parallel; rank 0 writes ``manifest.json``."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    sizes = _from_rank0(_list_files(directory) if rank == 0 else None)
    mine = {name: crc32_file(directory / name) for name in _share(sizes, rank, world)}
    gathered = collectives.gather_objects(mine, dst=0)
    if rank == 0:
        crcs = {k: v for part in gathered for k, v in part.items()}
        files = {name: {"size": size, "crc32": crcs[name]} for name, size in sizes.items()}
        (directory / MANIFEST_FILE).write_text(json.dumps({"version": 1, "files": files}, indent=1))


def read_manifest(directory: Path) -> Optional[Dict[str, dict]]:
    """``{relative path: {"size", "crc32"}}``, or None when the checkpoint has no manifest.

    Raises ValueError for a manifest that cannot be parsed.
    """
    path = directory / MANIFEST_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{path} is unreadable ({err})") from err


def check_sizes(directory: Path) -> Optional[str]:
    """What makes ``directory`` incomplete without reading file contents, or None if nothing.

    With a manifest: every listed file present with its recorded size. Without one (a
    checkpoint written before manifests, or converted): ``metadata.json``, ``common.pt`` and
    every shard file that torch's ``.metadata`` refers to, each long enough for its entries.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} does not exist"
    try:
        files = read_manifest(directory)
    except ValueError as err:
        return str(err)
    if files is None:
        return _check_legacy(directory)
    for name, entry in files.items():
        problem = _size_problem(directory / name, entry["size"], exact=True)
        if problem:
            return problem
    return None


def _size_problem(path: Path, expected: int, exact: bool) -> Optional[str]:
    """A missing file, or one shorter than (``exact``: other than) ``expected`` bytes."""
    if not path.is_file():
        return f"{path} is missing"
    size = path.stat().st_size
    if size < expected or (exact and size != expected):
        source = "the manifest records" if exact else ".metadata needs at least"
        return f"{path} has {size} bytes but {source} {expected} (truncated or replaced)"
    return None


def _check_legacy(directory: Path) -> Optional[str]:
    for name in ("metadata.json", "common.pt", ".metadata"):
        if not (directory / name).is_file():
            return f"{directory / name} is missing (no {MANIFEST_FILE} either)"
    from torch.distributed.checkpoint import FileSystemReader

    try:
        storage = FileSystemReader(str(directory)).read_metadata().storage_data
    except Exception as err:  # noqa: BLE001 - a truncated pickle raises anything from EOFError up
        return f"{directory / '.metadata'} is unreadable ({type(err).__name__}: {err})"
    needed: Dict[str, int] = {}
    for info in storage.values():
        needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
    for name, size in sorted(needed.items()):
        problem = _size_problem(directory / name, size, exact=False)
        if problem:
            return problem
    return None


def verify(directory: Path) -> Optional[str]:
    """Collective: :func:`check_sizes`, then every checksum of the manifest, in parallel.

    Returns the first problem (the same on every rank) or None for a complete checkpoint.
    """
    problem = _from_rank0(check_sizes(directory) if torch.distributed.get_rank() == 0 else None)
    if problem is not None:
        return problem
    files = read_manifest(directory)
    if files is None:
        return None
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    mine = [name for name in _share({n: e["size"] for n, e in files.items()}, rank, world)
            if crc32_file(directory / name) != files[name]["crc32"]]
    gathered = collectives.all_gather_objects(mine)
    bad = sorted(name for part in gathered for name in part)
    return f"{directory / bad[0]} does not match its checksum in {MANIFEST_FILE} (corrupt)" if bad else None
