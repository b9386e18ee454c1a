"""Every ``torch.distributed`` collective of the package, with its tensors on the training device.

NCCL accepts only CUDA tensors (``Backend.backend_capability["nccl"] == ["cuda"]``), even in a
one-rank group; gloo accepts host tensors too, so a CPU test cannot catch a host tensor handed
to a collective (DPO's reference table did exactly that). Here each tensor collective moves its
input to :func:`~megatron_qwen.platform.device.current_device` when it is elsewhere and returns
the result where the caller's tensor lives, so callers may pass host values (index tables,
counters) and read host values back. Placement is decided in this one reviewed file:
``tests/test_collectives.py`` fails on any collective call elsewhere in the package.

The object collectives pickle through the backend's device themselves (the current CUDA device
under NCCL); they are here so that the rule has no exceptions.
"""

from __future__ import annotations

from typing import Any, List, Optional

import torch
import torch.distributed as dist

from megatron_qwen.platform.device import current_device

Group = Optional[dist.ProcessGroup]
ReduceOp = dist.ReduceOp


def _on_device(tensor: torch.Tensor) -> torch.Tensor:
    device = current_device()
    return tensor if tensor.device == device else tensor.to(device)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = ReduceOp.SUM, group: Group = None) -> torch.Tensor:
    """Reduces ``tensor`` in place over ``group`` (on the device, copied back if it lives elsewhere); returns it."""
    work = _on_device(tensor)
    dist.all_reduce(work, op=op, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def all_gather(tensor: torch.Tensor, group: Group = None) -> List[torch.Tensor]:
    """Every rank's ``tensor`` (equal shapes) in rank order, on the device ``tensor`` lives on.

    Not differentiable: for values, tables and metrics (megatron's mappings carry gradients).
    """
    work = _on_device(tensor).contiguous()
    parts = [torch.empty_like(work) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, work, group=group)
    return [part.to(tensor.device) for part in parts]


def all_gather_into_tensor(output: torch.Tensor, tensor: torch.Tensor, group: Group = None) -> torch.Tensor:
    """Every rank's ``tensor`` concatenated along dim 0 into ``output`` (same device rules); returns ``output``."""
    work_out, work_in = _on_device(output), _on_device(tensor).contiguous()
    dist.all_gather_into_tensor(work_out, work_in, group=group)
    if work_out is not output:
        output.copy_(work_out)
    return output


def broadcast(tensor: torch.Tensor, src: int, group: Group = None) -> torch.Tensor:
    """``tensor`` of global rank ``src`` in place on every rank of ``group``; returns it."""
    work = _on_device(tensor)
    dist.broadcast(work, src=src, group=group)
    if work is not tensor:
        tensor.copy_(work)
    return tensor


def barrier(group: Group = None) -> None:
    """Waits for every rank of ``group``."""
    dist.barrier(group=group)


def broadcast_object(value: Any, src: int = 0) -> Any:
    """``value`` of global rank ``src`` (picklable) on every rank."""
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(value: Any, dst: int = 0) -> Optional[List[Any]]:
    """Every rank's ``value`` in rank order on rank ``dst``; None elsewhere."""
    gathered = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(value, gathered, dst=dst)
    return gathered


def all_gather_objects(value: Any) -> List[Any]:
    """Every rank's ``value`` in rank order, on every rank."""
    gathered: List[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered
