"""Megatron ``dist_checkpointing`` files, written and read one tensor at a time.

Writing goes through ``dist_checkpointing.save`` (common state, ``metadata.json``,
sharding validation) with a sharded strategy of our own: megatron's ``torch_dist``
format, but each tensor chunk is produced only when PyTorch's checkpoint writer reaches
it. megatron's own writer resolves every tensor before writing the first byte, which
would hold the whole model in memory.

Reading asks ``dist_checkpointing.load`` for one layer's parameters at a time; it reads
the overlapping parts of whatever chunks the trainer saved at its TP/PP layout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import pickle
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
import torch.distributed.checkpoint as dcp
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from megatron_qwen.convert.mcore_layout import MegatronLayout, chunk_of
from megatron_qwen.convert.staging import ConvertError

ChunkKey = Tuple[str, Tuple[int, ...]]  # (checkpoint key, global offset)


class _LazyPlanner(MCoreSavePlanner):
    """Hands the writer each tensor chunk when it is about to be written, layer by layer."""

    def __init__(self, produce: Callable[[ChunkKey], torch.Tensor], order: Dict[ChunkKey, int]) -> None:
        super().__init__(flatten_state_dict=False)
        self.produce, self.order = produce, order

    def create_local_plan(self) -> SavePlan:
        # megatron groups chunks by key (all layers' QKV, then all layers' fc1, ...); writing
        # in model order instead reads each HF layer once and makes progress per layer.
        plan = super().create_local_plan()
        self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=self._position))
        return self.plan

    def _position(self, item: WriteItem) -> int:
        if item.type == WriteItemType.BYTE_IO:
            return -1
        return self.order[(item.index.fqn, tuple(item.index.offset))]

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        return self.produce((write_item.index.fqn, tuple(write_item.index.offset)))


class _LazyTorchDistSave(SaveShardedStrategy):
    """megatron's ``torch_dist`` checkpoint format with tensors produced on demand."""

    def __init__(self, produce: Callable[[ChunkKey], torch.Tensor], order: Dict[ChunkKey, int]) -> None:
        super().__init__("torch_dist", 1)
        self.produce, self.order = produce, order

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        flat, _, _ = _replace_state_dict_keys_with_sharded_keys(sharded_state_dict, keep_only_main_replica=True)
        # NOTE: one file per chunk. PyTorch's writer keeps every tensor written to a file
        # alive until that file is closed, so one file for everything would end up holding
        # the embedding and a chunk of every key (the output layer too) at once.
        writer = dcp.FileSystemWriter(str(checkpoint_dir), thread_count=1, single_file_per_rank=False)
        dcp.save(mcore_to_pyt_state_dict(flat, is_loading=False), storage_writer=writer,
                 planner=_LazyPlanner(self.produce, self.order))


def write_checkpoint(layout: MegatronLayout, out_dir: Path, param_value: Callable[[str], torch.Tensor]) -> None:
    """Writes a megatron checkpoint of ``layout`` whose parameter values come from ``param_value(name)``.

    ``param_value`` is called once per parameter, in writing order, and its result is
    dropped once that parameter's chunks are written.
    """
    owner: Dict[ChunkKey, Tuple[str, ShardedTensor]] = {
        (c.key, tuple(c.global_offset)): (name, c) for name, chunks in layout.chunks.items() for c in chunks}
    value = functools.lru_cache(maxsize=1)(param_value)  # the two SwiGLU chunks of fc1 come in a row

    def produce(key: ChunkKey) -> torch.Tensor:
        name, chunk = owner[key]
        return chunk_of(value(name), chunk).to(layout.dtype)

    state = {"model": layout.sharded_state_dict(), "iteration": 0, "consumed_samples": 0}
    order = {key: i for i, key in enumerate(owner)}  # model order: embedding, layer 0, ..., head
    dist_checkpointing.save(state, str(out_dir), sharded_strategy=_LazyTorchDistSave(produce, order))


# What a damaged checkpoint raises from inside megatron and torch.distributed.checkpoint: a
# metadata.json of other fields, an unpicklable .metadata or common.pt, a shard overwritten.
_DAMAGE = (CheckpointException, CheckpointingException, OSError, EOFError, pickle.UnpicklingError, ValueError,
           TypeError, KeyError, IndexError, AttributeError, ImportError, RuntimeError)


def _cause(err: BaseException) -> str:
    if isinstance(err, CheckpointException):  # its text is a whole remote traceback per rank
        err = next(iter(err.failures.values()))[0]
    return " ".join(f"{type(err).__name__}: {err}".split())[:300]


@contextlib.contextmanager
def reading(ckpt_dir: Path) -> Iterator[None]:
    """Turns what a damaged checkpoint raises while being read into one :class:`ConvertError`."""
    try:
        yield
    except ConvertError:
        raise
    except _DAMAGE as err:
        raise ConvertError(f"cannot read checkpoint {ckpt_dir} ({_cause(err)}); it is damaged or incomplete: "
                           "copy it again, or use another checkpoint") from err


def check_complete(ckpt_dir: Path) -> None:
    """Raises unless every shard file that the checkpoint's index (``.metadata``) names is there in full.

    Costs one stat per file and a read of the small common state (``common.pt``): a truncated
    or deleted file fails here, before any output is written or any rank is started.
    """
    with reading(ckpt_dir):
        dist_checkpointing.load_common_state_dict(str(ckpt_dir))
        metadata = dcp.FileSystemReader(str(ckpt_dir)).read_metadata()
        ends: Dict[str, int] = {}
        for info in metadata.storage_data.values():
            ends[info.relative_path] = max(ends.get(info.relative_path, 0), info.offset + info.length)
    for name, end in sorted(ends.items()):
        path = Path(ckpt_dir) / name
        size = path.stat().st_size if path.is_file() else None
        if size is None or size < end:
            state = "missing" if size is None else f"truncated ({size} bytes, its index needs {end})"
            raise ConvertError(f"checkpoint file {path} is {state}; copy the checkpoint again, or use another one")


def stored_tensors(ckpt_dir: Path) -> Dict[str, ShardedTensor]:
    """Checkpoint key -> global shape and dtype of every tensor saved in ``ckpt_dir``."""
    with reading(ckpt_dir):
        return dist_checkpointing.load_tensors_metadata(str(ckpt_dir))


def check_compatible(layout: MegatronLayout, ckpt_dir: Path, source: str) -> None:
    """Raises unless ``ckpt_dir`` holds exactly the model tensors of ``layout``."""
    stored = stored_tensors(ckpt_dir)
    expected = {c.key: c.global_shape for chunks in layout.chunks.values() for c in chunks}
    problems = [f"{k}: missing" for k in sorted(expected) if k not in stored]
    problems += [f"{k}: shape {tuple(stored[k].global_shape)}, the model needs {tuple(shape)}"
                 for k, shape in sorted(expected.items()) if k in stored and stored[k].global_shape != shape]
    model_prefixes = ("embedding.", "decoder.", "output_layer.")
    problems += [f"{k}: not part of the model" for k in sorted(stored)
                 if k.startswith(model_prefixes) and k not in expected]
    if problems:
        raise ConvertError(f"{ckpt_dir} does not match the model of {source}: " + "; ".join(problems[:6]))


def _request(chunks: List[ShardedTensor], shape: torch.Size, rows: slice, dtype: torch.dtype) -> ShardedTensor:
    # One read of rows [start, stop) of the whole TP1 parameter, across all its chunks. No
    # prepended axes and no regular grid: megatron's prepended-axis path assumes every rank
    # holds a full grid of chunks, which a one-process read of a part of one layer is not.
    first = chunks[0]
    n = first.prepend_axis_num
    local = (1,) * n + (rows.stop - rows.start, *shape[1:])  # [1 per layer/expert axis, rows, *rest]
    offset = tuple(first.global_offset[:n]) + (rows.start,) + (0,) * (len(shape) - 1)
    return ShardedTensor(key=first.key, data=torch.empty(local, dtype=dtype), dtype=dtype, local_shape=local,
                         global_shape=first.global_shape, global_offset=offset, axis_fragmentations=None)


def read_params(layout: MegatronLayout, ckpt_dir: Path, names: Iterable[str],
                rows: Optional[slice] = None) -> Dict[str, torch.Tensor]:
    """Full (TP1) values of the named parameters (or just ``rows`` of each), from a checkpoint
    saved at any layout."""
    chunks = layout.chunks
    shapes = {name: layout.param_shapes[name] for name in names}
    spans = {name: rows or slice(0, shape[0]) for name, shape in shapes.items()}
    request = {name: _request(chunks[name], shapes[name], spans[name], layout.dtype) for name in shapes}
    # Reading a part of the model is partial by design: skip the whole-model coverage check.
    with reading(ckpt_dir):
        loaded = dist_checkpointing.load(request, str(ckpt_dir), validate_access_integrity=False)
    return {name: loaded[name].reshape(spans[name].stop - spans[name].start, *shapes[name][1:]) for name in shapes}
