"""What the local core attention needs beyond plain causal SDPA: packed rows and context parallelism.

Context parallel by all-gather (what Transformer Engine calls ``cp_comm_type=all_gather``):
every CP rank all-gathers K and V of the whole row over the CP group (their gradients are
reduce-scattered back in backward), puts the gathered chunks back into natural order, and
its local queries attend with a mask built from global positions: key ``k`` is visible to
query ``q`` when both lie in the same sub-sequence and ``k <= q``. (``is_causal=True`` would
be wrong here: SDPA aligns its causal mask top-left when query and key lengths differ.)

Memory, per layer and rank, with ``S`` the global and ``S/cp`` the local length: the
gathered K and V, ``2*S*b*g*d`` values (g KV heads per TP rank, d head dim), live through
the layer's backward, plus one additive mask of ``(S/cp)*S`` values shared by all layers of
the micro-batch (built in the activation dtype: SDPA would otherwise convert a boolean mask
into a new float copy per layer and keep each for the backward). Ring attention (TE's p2p) holds only the local ``2*(S/cp)*b*g*d`` and one
neighbour's block in flight, at the price of ``cp`` rounds of send/receive overlapped with
blockwise attention and an online softmax. With GQA (Qwen2.5: 4 or 8 KV heads against 28
to 64 query heads) the gathered K/V is small beside the queries and activations, which is
why the simple, exact all-gather was chosen for the path without Transformer Engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

from megatron_qwen.model.context_parallel import owner_ranks, row_bounds, sequence_ids


@dataclass(frozen=True)
class AttentionView:
    """One rank's view of a row: how to order gathered keys and which ones each query sees."""

    key_order: torch.Tensor  # [S] index into the rank-ordered gathered keys, natural order out
    mask: torch.Tensor  # [1, 1, S/cp, S] additive: 0 where a local query may attend a key, -inf elsewhere


def build_view(local_len: int, cp: int, rank: int, packed: Optional[PackedSeqParams],
               device: torch.device, dtype: torch.dtype = torch.float32) -> AttentionView:
    """The view of CP rank ``rank`` for a row of ``local_len * cp`` positions (mask in ``dtype``)."""
    total = local_len * cp
    bounds = row_bounds(total, packed, device)
    owner = owner_ranks(bounds, total, cp)
    gathered = torch.argsort(owner, stable=True)  # global position of each gathered key
    query = gathered[rank * local_len:(rank + 1) * local_len]  # this rank's positions [S/cp]
    seq = sequence_ids(bounds, total)
    keys = torch.arange(total, device=device)
    allowed = (seq[query][:, None] == seq[None, :]) & (keys[None, :] <= query[:, None])
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill_(~allowed, float("-inf"))
    return AttentionView(key_order=torch.argsort(gathered), mask=mask[None, None])


# NOTE: one view serves every layer of a micro-batch (the packed params are one object per
# micro-batch; unpacked rows are keyed by their shape), so autograd stores one mask, not one
# per layer.
_last: Tuple[object, Optional[AttentionView]] = (None, None)


def attention_view(local_len: int, group: Optional[torch.distributed.ProcessGroup],
                   packed: Optional[PackedSeqParams], device: torch.device, dtype: torch.dtype) -> AttentionView:
    """:func:`build_view` for this rank of ``group`` (None: no context parallelism), cached."""
    global _last
    cp, rank = (group.size(), group.rank()) if group is not None else (1, 0)
    key = (packed, dtype) if packed is not None else (local_len, cp, rank, device, dtype)
    cached = _last[0]
    same = cached == key if packed is None else (isinstance(cached, tuple) and cached[0] is packed
                                                 and cached[1] == dtype)
    if not same:
        _last = (key, build_view(local_len, cp, rank, packed, device, dtype))
    return _last[1]


def gather_in_natural_order(x: torch.Tensor, group: torch.distributed.ProcessGroup,
                            view: AttentionView) -> torch.Tensor:
    """All-gathers ``x`` [S/cp, ...] over the CP group (reduce-scatter in backward), natural order."""
    gathered = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=True, group=group)
    return gathered.index_select(0, view.key_order)  # [S, ...]
