"""What a complete checkpoint holds: per-file sizes and CRC32 checksums (``manifest.json``).

The manifest is written into ``iter_XXXXXXX.tmp`` after every rank finished writing and
before the directory is renamed, so a checkpoint directory without one was either written
before manifests existed or never finished.

A 72B checkpoint is about 1 TB: reading it all again to checksum it would keep training
waiting for minutes at every save. So each rank's checkpoint writer checksums the files it
has just written (:func:`record_checksums`, megatron's forked writer process with async
save) and leaves the result in a small record file in ``iter_XXXXXXX.tmp``;
:func:`write_manifest`, at publish, folds the records into the manifest and checksums only
the files no writer recorded (``common.pt``, ``.metadata``, ``metadata.json``,
``run_config.yaml``: small), split over all ranks. Each rank deletes its record before the
manifest is written, so a published directory never holds one.

Two checks: :func:`check_sizes` (one process, no file contents read; tools use it) and
:func:`verify` (collective; sizes, then every checksum, read in parallel).
"""

from __future__ import annotations

import json
import logging
import re
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch

from megatron_qwen.platform import collectives

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
_CHUNK = 16 << 20  # bytes per read while checksumming
_RECORD = ".checksums_rank{:05d}.json"  # a writer's checksums, in iter_XXXXXXX.tmp until the manifest
_RECORD_NAME = re.compile(r"\.checksums_rank\d{5}\.json")


def crc32_file(path: Path) -> int:
    """CRC32 of a file, read in chunks (zlib runs at about 1 GB/s per core)."""
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def _list_files(directory: Path) -> Dict[str, int]:
    """Relative path -> size of every regular file under ``directory`` but the manifest."""
    files = {str(p.relative_to(directory)): p.stat().st_size for p in directory.rglob("*")
             if p.is_file() and p.name != MANIFEST_FILE and not _RECORD_NAME.fullmatch(p.name)}
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


def record_checksums(directory: Path, paths: Sequence[Path], rank: int) -> None:
    """Checksums ``paths`` (files under ``directory`` that rank ``rank``'s writer has just
    written and closed) and records them for :func:`write_manifest`.

    Runs in the checkpoint writer, off the training loop; the files are read back in parallel
    threads (zlib releases the GIL), mostly from the page cache. Missing files (a failed
    write, which megatron's finalize reports) are left out.
    """
    paths = [p for p in paths if p.is_file()]
    if not paths:
        return
    with ThreadPoolExecutor(max_workers=len(paths)) as pool:
        crcs = list(pool.map(crc32_file, paths))
    entries = {str(p.relative_to(directory)): {"size": p.stat().st_size, "crc32": crc} for p, crc in zip(paths, crcs)}
    (Path(directory) / _RECORD.format(rank)).write_text(json.dumps(entries))


def _take_record(directory: Path, rank: int) -> Dict[str, dict]:
    """This rank's writer's record (empty if none, or cut short by a crash), deleted."""
    path = directory / _RECORD.format(rank)
    try:
        entries = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except ValueError:
        log.warning("%s is unreadable; its files are checksummed again", path)
        entries = {}
    path.unlink()
    return entries


def write_manifest(directory: Path) -> None:
    """Collective: rank 0 writes ``directory``'s ``manifest.json`` from the writers' records
    (:func:`record_checksums`) and, read in parallel over the ranks, the checksums of the
    files no writer recorded (or whose size changed since)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    recorded = _take_record(directory, rank)  # before the gather below: no record is left once it is done
    sizes = _from_rank0(_list_files(directory) if rank == 0 else None)
    known = {name: entry["crc32"] for part in collectives.all_gather_objects(recorded)
             for name, entry in part.items() if sizes.get(name) == entry["size"]}
    rest = {name: size for name, size in sizes.items() if name not in known}
    mine = {name: crc32_file(directory / name) for name in _share(rest, rank, world)}
    gathered = collectives.gather_objects(mine, dst=0)
    if rank == 0:
        crcs = {**known, **{k: v for part in gathered for k, v in part.items()}}
        files = {name: {"size": size, "crc32": crcs[name]} for name, size in sizes.items()}
        (directory / MANIFEST_FILE).write_text(json.dumps({"version": 1, "files": files}, indent=1))
        log.info("manifest of %s: %d files checksummed by their writers, %d (%.1f MB) at publish", directory.name,
                 len(known), len(rest), sum(rest.values()) / 1e6)


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
