"""Rollouts as training rows: prompt + completion, right-padded, the loss on completion tokens only.

Row ``i`` holds ``seq = prompt_i + completion_i`` as next-token pairs (``tokens = seq[:-1]``,
``labels = seq[1:]``) from position 0, then padding. ``loss_mask`` is 1 exactly where the
label is a completion token (the stop token included), so per-token log-probs of the
labels, masked, are the completion's log-probs under the model; the GRPO loss takes
``loss_mask`` as its ``mask``. Plain causal attention suffices: the padding comes after
every real token of its row.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_qwen.generation.engine import GenerationError, Rollouts


def rollout_batch(rollouts: Rollouts, seq_length: Optional[int] = None, pad_id: int = 0) -> Dict[str, torch.Tensor]:
    """``tokens``, ``labels``, ``loss_mask``, ``position_ids`` [n, s] of the rollouts.

    ``s`` is ``seq_length`` (a row that does not fit raises) or the longest row.
    """
    pairs = [len(p) + len(c) - 1 for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
    width = seq_length or max(pairs)
    if max(pairs) > width:
        raise GenerationError(f"a prompt + completion of {max(pairs) + 1} tokens does not fit seq_length={width} "
                              f"(+1 for the shifted labels); raise the sequence length or lower max_new_tokens")
    n = len(pairs)
    tokens = torch.full((n, width), pad_id, dtype=torch.long)
    labels = torch.full((n, width), pad_id, dtype=torch.long)
    loss_mask = torch.zeros(n, width)
    for row, (prompt, completion) in enumerate(zip(rollouts.prompt_ids, rollouts.completion_ids)):
        seq = torch.as_tensor(prompt + completion, dtype=torch.long)
        tokens[row, : len(seq) - 1], labels[row, : len(seq) - 1] = seq[:-1], seq[1:]
        loss_mask[row, len(prompt) - 1: len(seq) - 1] = 1.0  # labels prompt[-1] -> completion[0] onward
    position_ids = torch.arange(width).expand(n, width).contiguous()
    return {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
