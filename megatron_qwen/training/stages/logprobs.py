"""Log-probabilities of given tokens under the model, at any TP/PP layout (DPO, GRPO, evaluation).

``GPTModel(tokens, position_ids, None, labels=labels)`` returns, on the last pipeline stage,
megatron's vocab-parallel cross entropy per token [r, s]: ``-log p(label)`` computed from the
TP-sharded logits with two all-reduces over the TP group, never gathering the vocabulary. Other
pipeline stages return the activations the schedule sends on; the schedule calls the loss
function (where these helpers run) on the last stage only.

From vocab-parallel logits [..., V/tp] (GRPO, evaluation), :func:`token_logprobs` is that cross
entropy negated (differentiable) and :func:`token_entropy` a metric computed without autograd
from one max and one sum all-reduce, ``H = log Z + m - sum_v p_v * l_v`` with ``m`` the max logit
and ``Z = sum_v exp(l_v - m)``; neither gathers the vocabulary.
"""

from __future__ import annotations

from functools import partial
from typing import Dict, List, Optional

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_qwen.config.schema import Config
from megatron_qwen.platform import collectives
from megatron_qwen.training.stage import Batch, Stage
from megatron_qwen.training.step import run_microbatches


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """[b, k, s] -> [b*k, s]: the k sequences of each sample become consecutive rows."""
    return x.reshape(-1, x.shape[-1])


def forward_token_nll(model: torch.nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """One model chunk on rows [r, s] (causal attention, positions 0..s-1): the per-token
    ``-log p(label)`` [r, s] on the last pipeline stage, else the activations to send on."""
    position_ids = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
    return model(tokens, position_ids, None, labels=labels)


def token_logps(token_nll: torch.Tensor) -> torch.Tensor:
    """Per-token log-probs [r, s] in fp32 from the model's per-token loss."""
    return -token_nll.float()


def sequence_logps(token_nll: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of the log-probs of each row's masked tokens [r] (fp32)."""
    return (token_logps(token_nll) * mask.float()).sum(dim=-1)


class SequenceLogpsPass(Stage):
    """A forward-only pass reporting the log-probs of each micro-batch's masked tokens.

    Samples hold ``tokens``, ``labels`` and ``loss_mask`` of shape [k, s] (k = ``rows_per_sample``).
    Reports sequence sums [b, k], or with ``per_token`` the masked per-token log-probs [b, k, s]
    (e.g. for a per-token KL term). Run it with :func:`sequence_logps_pass` on any model chunks
    (the policy, a frozen reference).
    """

    def __init__(self, cfg: Config, rows_per_sample: int, per_token: bool = False) -> None:
        super().__init__(cfg)
        self.rows_per_sample = rows_per_sample
        self.per_token = per_token

    def forward_step(self, model: torch.nn.Module, batch: Batch, packed_seq_params=None):
        output = forward_token_nll(model, as_rows(batch["tokens"]), as_rows(batch["labels"]))
        return output, partial(_report_logps, batch["loss_mask"], self.per_token)


def _report_logps(loss_mask: torch.Tensor, per_token: bool, output: torch.Tensor):
    mask = as_rows(loss_mask)  # [b*k, s]
    logps = token_logps(output) * mask if per_token else sequence_logps(output, mask)
    logps = logps.view(*loss_mask.shape[:2], *logps.shape[1:]).detach()  # [b, k] or [b, k, s]
    return logps.sum(), torch.tensor(loss_mask.shape[0], dtype=torch.int), {"logps": logps}


@torch.no_grad()
def sequence_logps_pass(logps_pass: SequenceLogpsPass, chunks: List[torch.nn.Module], batches: List[List[Batch]],
                        seq_length: int, micro_batch_size: int) -> Optional[List[torch.Tensor]]:
    """The log-probs ([b, k], or [b, k, s] per token) of every micro-batch of one global batch under ``chunks``.

    ``batches`` holds this rank's micro-batches once per model chunk (VPP). Returns them in
    micro-batch order on the last pipeline stage, None on the other stages.
    """
    losses: List[Dict] = run_microbatches(logps_pass, chunks, [iter(b) for b in batches], len(batches[0]),
                                          seq_length, micro_batch_size, forward_only=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return [item["logps"] for item in losses]


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
