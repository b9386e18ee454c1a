"""Next-token prediction over ``loss_mask``: pretraining, long-context training and SFT.

The three differ only in data (``data.type``: token blends, or chat conversations whose
loss mask covers assistant turns) and settings (sequence length, RoPE), not in the loss.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.training.stage import Batch, LossFunc, Stage, metric


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss sum; megatron divides by the global token count once (per-token loss).

    Returns ``(loss_sum, num_tokens, {"loss": [loss_sum, num_tokens]})``.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()  # output_tensor: [b, s]
    num_tokens = mask.sum().to(torch.int)
    return loss_sum, num_tokens, {"loss": metric(loss_sum, mask.sum())}


class LanguageModelStage(Stage):
    """pretrain / long_context / sft: cross entropy on the tokens ``loss_mask`` selects."""

    def build_datasets(self, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
        return build_datasets(self.cfg, train_samples, valid_samples)

    def forward_step(self, model: torch.nn.Module, batch: Batch,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> Tuple[torch.Tensor, LossFunc]:
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                       packed_seq_params=packed_seq_params)  # [b, s/cp] per-token loss
        return output, partial(lm_loss, batch["loss_mask"])

    def eval_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        loss = metrics["loss"]
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50))}
