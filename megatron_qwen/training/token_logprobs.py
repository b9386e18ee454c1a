"""Per-token log-probs and entropy from vocab-parallel logits [..., V/tp], never gathering the vocabulary.

The log-prob of a target is megatron's vocab-parallel cross entropy negated (two all-reduces
over the TP group, differentiable). The entropy is a metric: computed without autograd from
one max and one sum all-reduce, ``H = log Z + m - sum_v p_v * l_v`` with ``m`` the max logit
and ``Z = sum_v exp(l_v - m)``.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_qwen.platform import collectives


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``log p(target)`` [...] in fp32 from this rank's vocabulary shard of the logits [..., V/tp]."""
    return -tensor_parallel.vocab_parallel_cross_entropy(logits.float(), targets)


@torch.no_grad()
def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy [...] in fp32 of the full-vocabulary distribution whose shard is ``logits`` [..., V/tp]."""
    group = parallel_state.get_tensor_model_parallel_group()
    logits = logits.float()
    peak = logits.max(dim=-1).values
    collectives.all_reduce(peak, op=collectives.ReduceOp.MAX, group=group)
    weights = torch.exp(logits - peak[..., None])
    sums = torch.stack([weights.sum(-1), (weights * logits).sum(-1)])  # [2, ...]: Z, sum_v e_v * l_v
    collectives.all_reduce(sums, group=group)
    return torch.log(sums[0]) + peak - sums[1] / sums[0]
