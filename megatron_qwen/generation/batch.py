"""Rollouts as training rows: prompt + completion, right-padded, the loss on completion tokens only.

Row ``i`` holds ``seq = prompt_i + completion_i`` as next-token pairs (``tokens = seq[:-1]``,
``labels = seq[1:]``) from position 0, then padding. ``loss_mask`` is 1 exactly where the
label is a completion token (the stop token included), so per-token log-probs of the
labels, masked, are the completion's log-probs under the model; the GRPO loss takes
``loss_mask`` as its ``mask``. Plain causal attention suffices: the padding comes after
every real token of its row.

:func:`packed_rows` lays chosen rollouts end to end in one row instead (THD: no padding,
``cu_seqlens`` marks where each sequence starts, positions restart at 0 for each), which is
what GRPO's training passes read.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from megatron_qwen.generation.engine import GenerationError, Rollouts


def _check_fits(pairs: List[int], width: int) -> None:
    if max(pairs) > width:
        raise GenerationError(f"a prompt + completion of {max(pairs) + 1} tokens does not fit seq_length={width} "
                              f"(+1 for the shifted labels); raise the sequence length or lower max_new_tokens")


def _pairs(prompt: List[int], completion: List[int]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``tokens``, ``labels``, ``loss_mask`` [len(prompt) + len(completion) - 1] of one rollout."""
    seq = torch.as_tensor(prompt + completion, dtype=torch.long)
    mask = torch.zeros(len(seq) - 1)
    mask[len(prompt) - 1:] = 1.0  # labels prompt[-1] -> completion[0] onward
    return seq[:-1], seq[1:], mask


def rollout_batch(rollouts: Rollouts, seq_length: Optional[int] = None, pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """``tokens``, ``labels``, ``loss_mask``, ``position_ids`` [n, s] of the rollouts.

    ``s`` is ``seq_length`` (a row that does not fit raises) or the longest row.
    """
    pairs = [len(p) + len(c) - 1 for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
    width = seq_length or max(pairs)
    _check_fits(pairs, width)
    n = len(pairs)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, width)
    for row, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        length = len(prompt) + len(completion) - 1
        tokens[row, :length], labels[row, :length], loss_mask[row, :length] = _pairs(prompt, completion)
    position_ids = torch.arange(width).expand(n, width).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}


def packed_rows(rollouts: Rollouts, rows: Sequence[int], seq_length: int, multiple: int = 1,
                pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """Rollouts ``rows`` as one packed row: ``tokens``, ``labels``, ``loss_mask``, ``position_ids``
    [1, t] and ``cu_seqlens`` [1, len(rows) + 1] (int32); t is the sum of their lengths rounded up
    to ``multiple`` (sequence parallel splits the row over the TP ranks) by ``pad_id`` tokens after
    the last rollout, in its sequence, without loss (causal attention: nothing before them sees them).

    Each rollout must fit ``seq_length`` (as in :func:`rollout_batch`), which bounds a row's share.
    """
    parts = [_pairs(rollouts.prompt_ids[i], rollouts.completion_ids[i]) for i in rows]
    lengths = [len(tokens) for tokens, _, _ in parts]
    _check_fits(lengths, seq_length)
    pad = -sum(lengths) % multiple
    if pad:
        tokens, labels, mask = parts[-1]
        filler = torch.full((pad,), pad_id, dtype=torch.long)
        parts[-1] = (torch.cat([tokens, filler]), torch.cat([labels, filler]), torch.cat([mask, torch.zeros(pad)]))
        lengths[-1] += pad
    batch = {key: torch.cat([part[k] for part in parts])[None] for k, key in enumerate(("tokens", "labels",
                                                                                           "loss_mask"))}
    batch["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    batch["cu_seqlens"] = torch.tensor([0, *lengths], dtype=torch.int32).cumsum(0, dtype=torch.int32)[None]
    return batch
