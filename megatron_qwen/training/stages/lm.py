"""Next-token prediction over ``loss_mask``: pretraining, long-context training and SFT.

The three differ only in data (``data.type``: token blends, or chat conversations whose
loss mask covers assistant turns) and settings (sequence length, RoPE), not in the loss.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Dict, Optional, Sequence, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.config.schema import Config
from megatron_qwen.data.datasets import build_datasets, domain_samples, valid_domains
from megatron_qwen.training.stage import Batch, LossFunc, Stage, metric


def lm_loss(loss_mask: torch.Tensor, output_tensor: torch.Tensor, domains: Sequence[str] = (),
            dataset_id: Optional[torch.Tensor] = None):
    """Per-token loss sum; megatron divides by the global token count once (per-token loss).

    Returns ``(loss_sum, num_tokens, {"loss": [loss_sum, num_tokens], "loss/<domain>": ...})``:
    with ``domains`` (validation), one more ``[sum, count]`` per dataset of the blend, every
    micro-batch reporting every domain (count 0 when absent) so DP ranks reduce the same names.
    """
    mask = loss_mask.reshape(-1).float()
    token_loss = output_tensor.float().reshape(-1) * mask  # output_tensor: [b, s] (or one packed row [1, b*s])
    loss_sum = token_loss.sum()
    num_tokens = mask.sum().to(torch.int)
    metrics = {"loss": metric(loss_sum, mask.sum())}
    if domains:
        metrics.update(domain_metrics(token_loss, mask, domains, dataset_id))
    return loss_sum, num_tokens, metrics


def domain_metrics(token_loss: torch.Tensor, mask: torch.Tensor, domains: Sequence[str],
                   dataset_id: Optional[torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``loss/<domain>`` ``[sum, count]`` of the tokens [t] (rows laid end to end) of each sample's dataset.

    ``dataset_id`` [b] is the blend index of each row (absent: one dataset, not blended); a
    packed micro-batch's row holds b equal-length rows, so token ``i`` belongs to row ``i // (t / b)``.
    """
    ids = torch.zeros(1, dtype=torch.long, device=mask.device) if dataset_id is None else dataset_id.long()
    per_token = ids.repeat_interleave(mask.numel() // ids.numel())  # [t]
    sums = torch.zeros(len(domains), device=mask.device).index_add_(0, per_token, token_loss)
    counts = torch.zeros(len(domains), device=mask.device).index_add_(0, per_token, mask)
    return {f"loss/{name}": metric(sums[i], counts[i]) for i, name in enumerate(domains)}


class LanguageModelStage(Stage):
    """pretrain / long_context / sft: cross entropy on the tokens ``loss_mask`` selects.

    Validation also reports the loss of each dataset of the validation blend
    (:func:`~megatron_qwen.data.datasets.valid_domains`), from the same batches.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.valid_domains = valid_domains(cfg)
        self._domains: Sequence[str] = ()  # set per global batch: the validation blend's names, or none

    def build_datasets(self, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
        return build_datasets(self.cfg, train_samples, valid_samples)

    def setup(self, model, iteration: int, run_dir, datasets) -> None:
        # Validation reads the first eval_iters global batches of its split every time.
        valid = datasets[1]
        evaluated = self.cfg.train.eval_iters * self.cfg.train.global_batch_size
        self.domain_samples = domain_samples(valid, evaluated) if valid is not None and self.valid_domains else []

    def before_step(self, iterators, num_microbatches: int, training: bool):
        # Training batches come from data.blend, validation from the validation blend: a
        # dataset_id means a domain of the latter only, and training reports none.
        self._domains = () if training else self.valid_domains
        return iterators

    def forward_step(self, model: torch.nn.Module, batch: Batch,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> Tuple[torch.Tensor, LossFunc]:
        output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                       packed_seq_params=packed_seq_params)  # [b, s/cp] per-token loss
        return output, partial(lm_loss, batch["loss_mask"], domains=self._domains,
                               dataset_id=batch.get("dataset_id"))

    def eval_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        record = {}
        for key, loss in metrics.items():  # loss, loss/<domain>
            suffix = key[len("loss"):]
            record[f"val_loss{suffix}"], record[f"val_ppl{suffix}"] = loss, math.exp(min(loss, 50))
        record.update({f"val_samples/{name}": n for name, n in zip(self.valid_domains, self.domain_samples)})
        return record
