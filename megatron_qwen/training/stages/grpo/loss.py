"""GRPO math as pure functions: group advantages, the clipped objective with a k3 KL, metrics.

Conventions follow trl's ``GRPOTrainer`` (trl 1.16, ``trainer/grpo_trainer.py``), which
tests/test_grpo_loss.py checks to 1e-6; the other references differ only where noted.

Advantages (trl, ``scale_rewards="group"``): ``A_i = (r_i - mean_g) / (std_g + eps)`` over the
G completions of a prompt, ``std_g`` with Bessel's correction and ``eps = 1e-4`` added to
the std (a group of equal rewards gets ``A = 0``, whatever eps). Options: ``std="population"``
(Megatron-LM's ``calculate_grpo_advantages``), ``std="none"`` (Dr. GRPO: centre only);
verl uses Bessel's std with ``eps=1e-6``.

Per token (trl, Megatron-LM, NeMo-RL, verl alike), with ``ratio = exp(logp - old_logp)``::

    loss_t = -min(ratio * A, clip(ratio, 1 - clip_low, 1 + clip_high) * A) + beta * kl_t
    kl_t   = exp(ref_logp - logp) - (ref_logp - logp) - 1      (k3; >= 0, unbiased for KL(pi||ref))

The old log-probs are the policy's own, recomputed just before the update, so the first
ratio of a rollout batch is exactly 1 and the clip only acts from the second optimizer step
on that batch.

Aggregation: ``"token"`` (default; trl ``loss_type="dapo"``/``"bnpo"``, Megatron-LM, verl
``token-mean``) weights every response token of the global batch equally: the loss is
``sum(loss_t) / #tokens``, so long answers are not down-weighted. ``"sequence"`` (trl
``loss_type="grpo"``, the DeepSeekMath paper) averages each completion's tokens first:
``sum_i mean_t(loss_t) / #sequences``. Both are returned as (sum, count) so that megatron's
per-token accounting (``calculate_per_token_loss=True``) divides once by the global count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from megatron_qwen.config.grpo import ADVANTAGE_STD as STD_MODES, AGGREGATIONS


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4,
                     std: str = "unbiased") -> torch.Tensor:
    """Advantages [n] of rewards [n] laid out as consecutive groups of ``group_size`` completions."""
    if std not in STD_MODES:
        raise ValueError(f"std={std!r} must be one of {STD_MODES}")
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)  # [prompts, G]
    centred = grouped - grouped.mean(dim=1, keepdim=True)
    if std == "none":
        return centred.view(-1)
    # NOTE: a group of one has no spread: its std is 0 (trl: NaN, then advantage 0 as well).
    spread = grouped.std(dim=1, keepdim=True, correction=int(std == "unbiased" and group_size > 1))
    return (centred / (spread + eps)).view(-1)


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """Schulman's k3 estimator of KL(policy || reference) per token."""
    delta = ref_logprobs - logprobs
    return torch.exp(delta) - delta - 1


@dataclass
class TokenTerms:
    """Per-token pieces of the objective [n, t] (for the loss and its metrics)."""

    loss: torch.Tensor
    kl: torch.Tensor
    ratio: torch.Tensor
    clipped_low: torch.Tensor  # ratio < 1 - clip_low where A < 0 (the clip removes the gradient)
    clipped_high: torch.Tensor  # ratio > 1 + clip_high where A > 0


def token_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                advantages: torch.Tensor, clip_low: float, clip_high: float, beta: float) -> TokenTerms:
    """The clipped surrogate plus ``beta`` * k3 KL per token; log-probs [n, t], advantages [n]."""
    adv = advantages[:, None].to(logprobs.dtype)  # one advantage per completion, [n, 1]
    ratio = torch.exp(logprobs - old_logprobs)
    clipped = torch.clamp(ratio, 1 - clip_low, 1 + clip_high)
    surrogate = -torch.min(ratio * adv, clipped * adv)
    kl = kl_k3(logprobs, ref_logprobs)
    loss = surrogate + beta * kl if beta else surrogate
    with torch.no_grad():
        low, high = (ratio < 1 - clip_low) & (adv < 0), (ratio > 1 + clip_high) & (adv > 0)
    return TokenTerms(loss, kl, ratio, low, high)


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str = "token") -> Tuple[torch.Tensor, torch.Tensor]:
    """(sum, count) of a per-token quantity [n, t] over the response tokens ``mask`` [n, t]."""
    mask = mask.to(per_token.dtype)
    if mode == "token":
        return (per_token * mask).sum(), mask.sum()
    if mode == "sequence":
        per_sequence = (per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        return per_sequence.sum(), per_token.new_tensor(float(len(per_sequence)))
    raise ValueError(f"aggregation={mode!r} must be one of {AGGREGATIONS}")


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
              beta: float = 0.04, aggregation: str = "token",
              entropy: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """``(loss_sum, count, metrics)`` of one micro-batch, megatron's per-token loss contract
    (``count`` an int tensor: response tokens, or completions for ``aggregation="sequence"``).

    Log-probs, ``mask`` and the optional per-token ``entropy`` are [n, t] over the completion
    tokens (``mask`` 1 on response tokens, 0 on prompt and padding); ``advantages`` is [n].
    The mean loss is ``loss_sum / count`` after summing both over micro-batches and
    data-parallel ranks. Each metric is a detached ``[sum, count]`` pair summed the same way
    (so its global value is ``sum / count``): ``kl``, ``clip_fraction`` (low or high clipped
    tokens), ``clip_low``, ``clip_high``, ``ratio``, ``response_length`` (per completion),
    ``entropy`` when given, and ``loss`` itself.
    """
    terms = token_terms(logprobs, old_logprobs, ref_logprobs, advantages, clip_low, clip_high, beta)
    loss_sum, count = aggregate(terms.loss, mask, aggregation)
    metrics = {"loss": torch.stack([loss_sum.detach(), count.detach()])}
    with torch.no_grad():
        tracked = {"kl": terms.kl, "clip_fraction": (terms.clipped_low | terms.clipped_high).float(),
                   "clip_low": terms.clipped_low.float(), "clip_high": terms.clipped_high.float(),
                   "ratio": terms.ratio}
        if entropy is not None:
            tracked["entropy"] = entropy
        for name, value in tracked.items():
            metrics[name] = torch.stack(aggregate(value.float(), mask, "token"))
        lengths = mask.float().sum(-1)  # [n]
        metrics["response_length"] = torch.stack([lengths.sum(), lengths.new_tensor(float(len(lengths)))])
    # NOTE: an int count, as megatron's schedules accumulate it into an int tensor.
    return loss_sum, count.round().to(torch.int), metrics
