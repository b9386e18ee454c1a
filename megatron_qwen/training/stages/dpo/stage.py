"""Direct preference optimization (stage=dpo) on preference pairs, numerically trl's DPO.

A micro-batch of b pairs is 2b rows (chosen, rejected of each pair next to each other), so
both sides of a pair share the micro-batch and the pipeline schedule step. The loss of a
micro-batch is the sum of its pairs' losses with count b: megatron divides by the global
number of pairs, so the loss is trl's batch mean whatever the layout. The reference
log-probs come with the samples (``stage.reference=precompute``) or from a frozen model run on
each global batch in :meth:`DPOStage.before_step` (``stage.reference=model``); see
:mod:`megatron_qwen.training.stages.reference`.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.config.schema import Config
from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.platform import collectives
from megatron_qwen.training.stage import Batch, LossFunc, Stage, metric
from megatron_qwen.training.stages.dpo.loss import log_ratios, pair_losses, pair_metrics
from megatron_qwen.training.stages.logprobs import (SequenceLogpsPass, as_rows, forward_token_nll, sequence_logps,
                                                    sequence_logps_pass, token_logps)
from megatron_qwen.training.stages.no_signal import NoSignalWatch
from megatron_qwen.training.stages.reference import ReferenceModel, precompute_reference

# The keys of metrics.jsonl and eval.jsonl (trl's names, accuracies/margins in the singular).
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracy", "rewards/margin", "logps/chosen",
           "logps/rejected")
CHOSEN_TOKENS = "chosen_tokens"  # batch key: response tokens of all chosen rows of the global batch


def preference_datasets(dataset) -> List[object]:
    """The PreferenceDatasets behind a split (one, or the members of a blend)."""
    if dataset is None:
        return []
    return list(dataset.datasets) if isinstance(dataset, BlendedDataset) else [dataset]


class DPOStage(Stage):
    """stage=dpo: sigmoid / IPO loss (+ an SFT term) against a frozen reference."""

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self.reference: Optional[ReferenceModel] = None
        self.logps_pass = SequenceLogpsPass(cfg, self.rows_per_sample)
        self.no_signal = NoSignalWatch(cfg.stage.no_signal_warn_steps)

    def build_datasets(self, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
        return build_datasets(self.cfg, train_samples, valid_samples)

    def setup(self, model: List[torch.nn.Module], iteration: int, run_dir: Path,
              datasets: Tuple[object, Optional[object]]) -> None:
        if self.cfg.stage.reference == "model":
            self.reference = ReferenceModel(self.cfg)
            return
        fresh = iteration == 0 and self.cfg.stage.reference_load is None  # the policy is still the reference
        members = [d for split in datasets for d in preference_datasets(split)]
        precompute_reference(members, run_dir, self.cfg, model, policy_is_reference=fresh)

    def before_step(self, iterators: List[Iterator[Batch]], num_microbatches: int,
                    training: bool) -> List[Iterator[Batch]]:
        batches = [[next(it) for _ in range(num_microbatches)] for it in iterators]
        if training:
            self.no_signal.step()
        if self.cfg.stage.sft_weight > 0:
            self._add_chosen_token_count(batches)
        if self.reference is not None:
            t = self.cfg.train
            logps = sequence_logps_pass(self.logps_pass, self.reference.chunks, batches, t.seq_length,
                                        t.micro_batch_size)
            if logps is not None:  # on the last pipeline stage, where the loss is computed
                for chunk_batches in batches:
                    for batch, ref in zip(chunk_batches, logps):
                        batch["ref_logps"] = ref  # [b, 2]
        return [iter(chunk_batches) for chunk_batches in batches]

    @staticmethod
    def _add_chosen_token_count(batches: List[List[Batch]]) -> None:
        # The SFT term is a mean over the chosen tokens of the global batch (trl's), which no
        # micro-batch knows alone: every batch gets the DP-wide total.
        total = sum(b["loss_mask"][:, 0].sum() for b in batches[0]).reshape(1).double()
        collectives.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
        for chunk_batches in batches:
            for batch in chunk_batches:
                batch[CHOSEN_TOKENS] = total[0].float()

    def forward_step(self, model: torch.nn.Module, batch: Batch,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> Tuple[torch.Tensor, LossFunc]:
        output = forward_token_nll(model, as_rows(batch["tokens"]), as_rows(batch["labels"]))  # [2b, s] (last stage)
        return output, partial(self._loss, batch)

    def _loss(self, batch: Batch, output: torch.Tensor):
        st = self.cfg.stage
        mask = batch["loss_mask"]  # [b, 2, s]
        b = mask.shape[0]
        policy = sequence_logps(output, as_rows(mask)).view(b, 2)
        ratios = log_ratios(policy, batch["ref_logps"])
        loss_sum = pair_losses(ratios, mask.sum(dim=-1), st).sum()
        if st.sft_weight > 0:
            chosen_nll = -(token_logps(output).view(b, 2, -1)[:, 0] * mask[:, 0]).sum()
            # Scaled so that summed over micro-batches and divided by the global pair count it is
            # sft_weight * (mean NLL over the global batch's chosen tokens).
            loss_sum = loss_sum + st.sft_weight * self.cfg.train.global_batch_size * chosen_nll / batch[CHOSEN_TOKENS]
        metrics = {"loss": metric(loss_sum, b)}
        metrics.update({name: metric(value.sum(), b) for name, value in pair_metrics(policy, ratios, st.beta).items()})
        return loss_sum, torch.tensor(b, dtype=torch.int, device=mask.device), metrics

    def train_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        return {name: metrics[name] for name in METRICS}

    def eval_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        record = self.train_record(metrics)  # the same keys, on the validation split
        if self.no_signal.steps:  # after some training: before it, the policy is the reference (ties)
            accuracy, st = record["rewards/accuracy"], self.cfg.stage
            self.no_signal.observe(accuracy > 0.5, (
                f"validation rewards/accuracy {accuracy:.2f} has stayed at or below chance (0.5) for {{steps}} steps: "
                f"the policy does not prefer the chosen responses. Check the pairs (chosen and rejected swapped?), "
                f"raise optim.lr (now {self.cfg.optim.lr:g}) or stage.beta (now {st.beta:g}), or start from a "
                "checkpoint trained on the same task (checkpoint.load=<an SFT run>)"))
        return record
