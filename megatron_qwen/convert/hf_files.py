"""Hugging Face weight files, one tensor at a time, in the safetensors format.

Both directions need what the ``safetensors`` library lacks. Reading: its tensors are
views of a memory-mapped file, whose pages count as resident memory for as long as the
mapping lives (measured: the 0.5B embedding's 519 MiB stayed resident through the whole
conversion); here each tensor is read into its own buffer with a plain file read.
Writing: a shard written incrementally. Since every tensor's name, shape and dtype are
known before conversion starts, each shard's header is written first and tensors are
appended as they are produced; memory holds one tensor, never one shard. The format:
8-byte little-endian header length, a JSON header (name -> dtype, shape, byte range),
then the tensor bytes.
"""

from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_qwen.convert.staging import ConvertError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
_DTYPES = {code: dtype for dtype, code in _CODES.items()}
# What a Hugging Face tokenizer directory may hold (transformers 5 saves the chat template as its own file).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json", "chat_template.jinja", "chat_template.json")


def _nbytes(shape: Sequence[int], dtype: torch.dtype) -> int:
    return int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class _Stored:
    file: str
    offset: int  # of the first byte in the file
    shape: Tuple[int, ...]
    dtype: torch.dtype


def _read_header(path: Path) -> Dict[str, _Stored]:
    try:
        with open(path, "rb") as f:
            length = struct.unpack("<Q", f.read(8))[0]
            if length > path.stat().st_size - 8:  # a damaged length would ask read() for exabytes
                raise ConvertError(f"{path} is not a safetensors file: its header length {length} exceeds the file")
            header = json.loads(f.read(length))
        header.pop("__metadata__", None)
        stored = {name: _Stored(path.name, 8 + length + info["data_offsets"][0], tuple(info["shape"]),
                                _DTYPES[info["dtype"]]) for name, info in header.items()}
        sizes_ok = all(info["data_offsets"][1] - info["data_offsets"][0] == _nbytes(t.shape, t.dtype)
                       for info, t in zip(header.values(), stored.values()))
    except ConvertError:
        raise
    except (OSError, struct.error) as err:
        raise ConvertError(f"cannot read {path}: {err}") from err
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RuntimeError, RecursionError) as err:
        # Whatever the JSON holds: a list, a name -> number map, negative shapes, other dtypes.
        raise ConvertError(f"{path}: unsupported dtype or malformed header ({type(err).__name__}: "
                           f"{' '.join(str(err).split())[:200]}); expected F32, BF16 or F16 tensors") from err
    if not sizes_ok:
        raise ConvertError(f"{path}: a tensor's byte range disagrees with its shape and dtype")
    # Checked before any work starts: a truncated file would otherwise fail halfway through.
    needed = max((t.offset + _nbytes(t.shape, t.dtype) for t in stored.values()), default=0)
    if path.stat().st_size < needed:
        raise ConvertError(f"{path} is truncated: {path.stat().st_size} bytes, its header describes {needed}; "
                           "download or copy it again")
    return stored


class HFWeights:
    """Names, shapes and dtypes of an HF model directory's tensors; reads them one by one."""

    def __init__(self, hf_dir: Path) -> None:
        self.dir = Path(hf_dir)
        weight_map = self._weight_map()
        self.stored: Dict[str, _Stored] = {}
        for file in sorted(set(weight_map.values())):
            self.stored.update(_read_header(self.dir / file))
        listed_missing = sorted(set(weight_map) - set(self.stored))
        if listed_missing:
            raise ConvertError(f"{self.dir / INDEX_FILE} lists tensors its shards lack: {listed_missing[:5]}")
        self.shapes = {name: t.shape for name, t in self.stored.items()}
        self.dtypes = {name: t.dtype for name, t in self.stored.items()}

    def _weight_map(self) -> Dict[str, str]:
        index, single = self.dir / INDEX_FILE, self.dir / SINGLE_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError) as err:  # ValueError: JSON or UTF-8
                raise ConvertError(f"{index} is not a safetensors index: {err}") from err
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConvertError(f"{index}: weight_map must map tensor names to shard file names")
            missing = sorted({f for f in weight_map.values() if not (self.dir / f).is_file()})
            if missing:
                raise ConvertError(f"{index} names shard files that do not exist: {missing}")
            return weight_map
        if single.is_file():
            return {name: SINGLE_FILE for name in _read_header(single)}
        others = sorted(p.name for p in self.dir.glob("*.bin"))
        hint = f" (found {others}: convert them to safetensors first)" if others else ""
        raise ConvertError(f"{self.dir} has neither {SINGLE_FILE} nor {INDEX_FILE}{hint}")

    def get(self, name: str) -> torch.Tensor:
        """One tensor, read into a buffer of its own."""
        stored = self.stored[name]
        out = torch.empty(stored.shape, dtype=stored.dtype)
        buffer = memoryview(out.reshape(-1).view(torch.uint8).numpy())
        with open(self.dir / stored.file, "rb") as f:
            f.seek(stored.offset)
            if f.readinto(buffer) != len(buffer):
                raise ConvertError(f"{self.dir / stored.file} is truncated: {name} is incomplete")
        return out


@dataclass
class _Shard:
    file: str
    names: List[str]
    shapes: List[Tuple[int, ...]]


def plan_shards(plan: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype, shard_size: int) -> List[_Shard]:
    """Packs tensors, in order, into shards of at most ``shard_size`` bytes (a larger tensor gets its own)."""
    shards: List[_Shard] = []
    used = 0
    for name, shape in plan:
        size = _nbytes(shape, dtype)
        if not shards or (used + size > shard_size and shards[-1].names):
            shards.append(_Shard("", [], []))
            used = 0
        shards[-1].names.append(name)
        shards[-1].shapes.append(tuple(shape))
        used += size
    for i, shard in enumerate(shards):
        shard.file = SINGLE_FILE if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def _header(shard: _Shard, dtype: torch.dtype) -> bytes:
    header: Dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in zip(shard.names, shard.shapes):
        size = _nbytes(shape, dtype)
        header[name] = {"dtype": _CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # safetensors pads the header so tensor data stays 8-byte aligned
    return struct.pack("<Q", len(blob)) + blob


class ShardWriter:
    """Writes planned tensors, in plan order, into HF safetensors shards plus their index.

    A tensor may arrive whole or as consecutive row blocks (so that the largest tensors,
    the embedding and the output layer, need not be held whole either).
    """

    def __init__(self, out_dir: Path, plan: Sequence[Tuple[str, Tuple[int, ...]]], dtype: torch.dtype,
                 shard_size: int) -> None:
        self.out_dir, self.dtype = Path(out_dir), dtype
        self.shards = plan_shards(plan, dtype, shard_size)
        self._queue = [(s, i) for s in self.shards for i in range(len(s.names))]
        self._next = 0
        self._rows = 0  # rows of the current tensor written so far
        self._file: Optional[BinaryIO] = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Appends the next planned tensor, or its next rows (cast to the output dtype)."""
        shard, i = self._queue[self._next]
        shape = shard.shapes[i]
        if name != shard.names[i] or tuple(tensor.shape[1:]) != shape[1:] or self._rows + len(tensor) > shape[0]:
            raise RuntimeError(f"write order broken: got {name} {tuple(tensor.shape)} at row {self._rows}, "
                               f"planned {shard.names[i]} {shape}")
        if i == 0 and self._rows == 0:
            self._file = open(self.out_dir / shard.file, "wb")
            self._file.write(_header(shard, self.dtype))
        data = tensor.detach().to(self.dtype).contiguous().view(torch.uint8)
        self._file.write(data.numpy().data)
        self._rows += len(tensor)
        if self._rows < shape[0]:
            return
        self._next, self._rows = self._next + 1, 0
        if i == len(shard.names) - 1:
            self._file.close()
            self._file = None

    def finish(self) -> None:
        """Checks that every planned tensor was written and writes the index for several shards."""
        if self._next != len(self._queue):
            raise RuntimeError(f"{len(self._queue) - self._next} planned tensors were never written")
        if len(self.shards) == 1:
            return
        total = sum(_nbytes(shape, self.dtype) for s in self.shards for shape in s.shapes)
        index = {"metadata": {"total_size": total},
                 "weight_map": {name: s.file for s in self.shards for name in s.names}}
        (self.out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(src: Path, out_dir: Path) -> List[str]:
    """Copies the tokenizer files found in ``src`` unchanged (byte for byte); returns their names."""
    found = [name for name in TOKENIZER_FILES if (Path(src) / name).is_file()]
    if "tokenizer.json" not in found and not {"vocab.json", "merges.txt"} <= set(found):
        raise ConvertError(f"{src} has no tokenizer (neither tokenizer.json nor vocab.json + merges.txt)")
    for name in found:
        shutil.copyfile(Path(src) / name, Path(out_dir) / name)
    return found


def parse_size(text: str) -> int:
    """``5GB`` / ``500MB`` / ``1.5GiB`` / ``1000`` -> bytes (decimal units, like transformers)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
    text = text.strip().upper()
    number = text.rstrip("KMGTIB")
    unit = text[len(number):]
    try:
        size = int(float(number) * units[unit])
    except (ValueError, KeyError, OverflowError) as err:  # OverflowError: 1e999 is infinite
        raise ConvertError(f"cannot parse size {text!r}; use e.g. 5GB, 500MB or a byte count") from err
    if size <= 0:
        raise ConvertError(f"size {text!r} must be positive")
    return size
