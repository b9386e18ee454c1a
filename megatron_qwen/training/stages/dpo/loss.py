"""DPO losses and metrics on sequence log-probs, as trl 1.16 computes them.

Reference: trl 1.16.0 ``trl/trainer/dpo_trainer.py``, ``DPOTrainer._compute_loss`` (loss types
``sigmoid``, ``ipo`` and ``sft``; f-divergence ``reverse_kl``, no ``ld_alpha``, no weighting).
Sequence log-probs are sums over the response tokens; the chosen/rejected log-ratio against
the reference is the implicit reward divided by beta.

- ``sigmoid``: ``-log sigmoid(beta * delta)`` with ``delta`` = chosen log-ratio - rejected
  log-ratio. With ``label_smoothing`` = eps it is conservative DPO (Mitchell 2023; trl < 1.0's
  sigmoid loss): ``-(1 - eps) log sigmoid(beta delta) - eps log sigmoid(-beta delta)``.
- ``ipo``: ``(delta_norm - 1 / (2 beta))^2`` with each log-ratio divided by its response's
  token count (trl's length normalization).
- the SFT term is trl's ``loss_type=["sigmoid", "sft"]`` with ``loss_weights=[1, sft_weight]``:
  the mean negative log-prob over all chosen response tokens of the batch.
"""

from __future__ import annotations

from typing import Dict

import torch
import torch.nn.functional as F

from megatron_qwen.config.schema import StageConfig


def log_ratios(policy: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """log pi(y|x) - log pi_ref(y|x) [b, 2] (chosen, rejected)."""
    return policy.float() - reference.float()


def pair_losses(ratios: torch.Tensor, lengths: torch.Tensor, stage: StageConfig) -> torch.Tensor:
    """Per-pair loss [b] from log-ratios [b, 2] and response token counts [b, 2]."""
    if stage.loss == "ipo":
        normalized = ratios / lengths.float().clamp(min=1.0)
        return (normalized[:, 0] - normalized[:, 1] - 1 / (2 * stage.beta)) ** 2
    logits = stage.beta * (ratios[:, 0] - ratios[:, 1])
    eps = stage.label_smoothing
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def pair_metrics(policy: torch.Tensor, ratios: torch.Tensor, beta: float) -> Dict[str, torch.Tensor]:
    """trl's per-pair metrics [b]: implicit rewards, their accuracy and margin, and log-probs."""
    rewards = beta * ratios.detach()
    return {"rewards/chosen": rewards[:, 0], "rewards/rejected": rewards[:, 1],
            "rewards/accuracy": (rewards[:, 0] > rewards[:, 1]).float(),
            "rewards/margin": rewards[:, 0] - rewards[:, 1],
            "logps/chosen": policy[:, 0].detach().float(), "logps/rejected": policy[:, 1].detach().float()}
