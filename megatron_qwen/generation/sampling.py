"""Choosing the next token from full-vocabulary logits: greedy, temperature, top-p.

Sampling is inverse-CDF over the vocabulary in token-id order with one uniform draw per
row, the draws coming from a CPU generator seeded by the caller. The same seed therefore
gives the same draws on CPU and GPU and at every TP size, and logits that differ by
rounding (TP1 vs TP2) pick the same token unless a draw lands within rounding distance of a
CDF step. Sorting happens only to find the top-p nucleus, never to order the CDF, so
near-ties between tokens cannot swap the outcome.
"""

from __future__ import annotations

import torch


def top_p_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Tokens of the nucleus [b, V]: the most probable ones whose mass reaches ``top_p``.

    A token is kept when the mass of the tokens ranked above it is below ``top_p`` (the top
    token always is), as transformers' ``TopPLogitsWarper`` keeps them.
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True, stable=True)
    mass_above = sorted_probs.cumsum(-1) - sorted_probs  # [b, V]
    keep_sorted = mass_above < top_p
    keep_sorted[:, 0] = True
    return torch.zeros_like(keep_sorted).scatter(-1, order, keep_sorted)


def sample_next(logits: torch.Tensor, temperature: float, top_p: float, uniform: torch.Tensor) -> torch.Tensor:
    """Next token ids [b] from logits [b, V] and one uniform draw in [0, 1) per row [b]."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)  # [b, V]
    if top_p < 1:
        probs = probs * top_p_mask(probs, top_p)
    cdf = probs.cumsum(-1)  # [b, V], flat over excluded tokens so they are never chosen
    target = uniform.to(cdf.device, cdf.dtype)[:, None] * cdf[:, -1:]  # [b, 1]
    index = torch.searchsorted(cdf, target, right=True)
    return index.clamp(max=logits.shape[-1] - 1).squeeze(-1)
