"""Context parallelism's load-balanced split, shared by the batch and the attention.

A sequence of ``S`` positions is cut into ``2*cp`` equal chunks and CP rank ``r`` keeps
chunks ``r`` and ``2*cp-1-r`` (megatron's ``get_batch_on_this_cp_rank``): under a causal
mask the early chunk has few keys and the late one many, so every rank does the same
attention work. A packed (THD) row is split the same way per sub-sequence, as Transformer
Engine's ``thd_get_partitioned_indices`` does, which is why each packed sub-sequence must
be a multiple of ``2*cp`` long. A rank's positions are kept in ascending global order.

Everything is computed from the sub-sequence boundaries of the *global* row
(``cu_seqlens``; ``[0, S]`` for an unpacked row), so any rank can derive any other rank's
positions without communication. Rotary embeddings follow the same layout inside megatron
(``get_pos_emb_on_this_cp_rank`` and the THD rotary path), so every token keeps its global
position.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron_qwen.platform import collectives


def row_bounds(total: int, packed: Optional[PackedSeqParams], device: torch.device) -> torch.Tensor:
    """Sub-sequence boundaries of the global row: ``packed.cu_seqlens_q`` or ``[0, total]``."""
    if packed is not None:
        return packed.cu_seqlens_q.to(device=device, dtype=torch.long)
    return torch.tensor([0, total], device=device)


def owner_ranks(bounds: torch.Tensor, total: int, cp: int) -> torch.Tensor:
    """[total] the CP rank holding each position of a row with sub-sequences ``bounds``."""
    pos = torch.arange(total, device=bounds.device)
    seq = torch.searchsorted(bounds[1:], pos, right=True)  # sub-sequence of each position
    start, length = bounds[seq], bounds[seq + 1] - bounds[seq]
    chunk = (pos - start) * (2 * cp) // length  # 0 .. 2cp-1 within the sub-sequence
    return torch.where(chunk < cp, chunk, 2 * cp - 1 - chunk)


def sequence_ids(bounds: torch.Tensor, total: int) -> torch.Tensor:
    """[total] the index of the sub-sequence each position belongs to."""
    return torch.searchsorted(bounds[1:], torch.arange(total, device=bounds.device), right=True)


def rank_positions(bounds: torch.Tensor, total: int, cp: int, rank: int) -> torch.Tensor:
    """Global positions (ascending) that CP rank ``rank`` holds."""
    return torch.nonzero(owner_ranks(bounds, total, cp) == rank).squeeze(1)


def split_batch(batch: Dict[str, torch.Tensor], packed: Optional[PackedSeqParams], cp: int,
                rank: int) -> Dict[str, torch.Tensor]:
    """This CP rank's part of every per-position tensor of a micro-batch.

    Tensors whose dim 1 is the sequence ([b, s], or [1, t] for a packed row) are split
    along it; ``attention_mask`` [b, 1, s, s] along its query dim only (keys stay global);
    anything else (``cu_seqlens``) is kept. ``packed`` keeps the global boundaries, which
    is what megatron's THD rotary path and Transformer Engine expect.
    """
    if cp == 1:
        return batch
    total = batch["tokens"].shape[1]
    index = rank_positions(row_bounds(total, packed, batch["tokens"].device), total, cp, rank)
    out = {}
    for key, value in batch.items():
        if key == "attention_mask" and value is not None:
            out[key] = value.index_select(2, index)
        elif value is not None and value.dim() >= 2 and value.shape[1] == total:
            out[key] = value.index_select(1, index)
        else:
            out[key] = value
    return out


def split_batch_for_this_rank(batch: Dict[str, torch.Tensor],
                              packed: Optional[PackedSeqParams]) -> Dict[str, torch.Tensor]:
    """:func:`split_batch` for this process's context-parallel rank (a no-op at cp=1)."""
    return split_batch(batch, packed, parallel_state.get_context_parallel_world_size(),
                       parallel_state.get_context_parallel_rank())


def gather_sequence(x: torch.Tensor, group: torch.distributed.ProcessGroup, dim: int = 1) -> torch.Tensor:
    """The inverse of the unpacked split: this CP group's parts of ``x`` along ``dim``, in natural order.

    No gradient flows back (for evaluation, e.g. comparing full logits [b, s, v]).
    """
    cp = group.size()
    if cp == 1:
        return x
    parts = collectives.all_gather(x, group=group)
    total = x.shape[dim] * cp
    owner = owner_ranks(row_bounds(total, None, x.device), total, cp)
    natural = torch.argsort(torch.argsort(owner, stable=True))  # position -> index in the gathered order
    return torch.cat(parts, dim).index_select(dim, natural)
