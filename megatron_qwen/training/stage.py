"""The contract between the shared training loop and one training stage.

A stage (pretrain, long_context, sft, dpo, grpo) decides three things only: what a batch
holds (:meth:`Stage.build_datasets`, :meth:`Stage.before_step`), how the loss is computed
from the model's output (:meth:`Stage.forward_step`) and how its metrics are named
(:meth:`Stage.train_record`, :meth:`Stage.eval_record`). The loop, checkpointing, signals
and metric sinks (:mod:`megatron_qwen.training.loop`) are shared and never copied.

Metric convention: every value of the metrics dict a loss function returns is a tensor
``[sum, count]`` (e.g. ``[loss summed over the micro-batch's tokens, number of tokens]``);
the logged value is ``sum / count`` with both summed over micro-batches and data-parallel
ranks (:func:`megatron_qwen.training.step.global_means`, at log intervals), so it does not depend on how the
global batch is split.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core.packed_seq_params import PackedSeqParams

from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import rows_per_sample

Batch = Dict[str, torch.Tensor]
# loss_func(output_tensor) -> (loss summed over the micro-batch, count it is normalized by, metrics):
# megatron sums both over micro-batches and DP ranks and scales the gradient by 1 / total count
# (calculate_per_token_loss=True), so the loss is a mean over the global batch.
LossFunc = Callable[[torch.Tensor], Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]]


def metric(total: torch.Tensor, count) -> torch.Tensor:
    """A ``[sum, count]`` metric entry (detached, float32)."""
    return torch.stack([total.detach().float().reshape(()),
                        torch.as_tensor(count, dtype=torch.float32, device=total.device).reshape(())])


class Stage:
    """Base class of the stages in :data:`megatron_qwen.training.stages.STAGES`."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        # Model rows one dataset sample becomes (a DPO pair: chosen and rejected). The schedule's
        # micro-batch (pipeline p2p shapes, TE userbuffers) is micro_batch_size * rows_per_sample rows.
        self.rows_per_sample = rows_per_sample(cfg.stage)

    def build_datasets(self, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
        """Map-style train and validation datasets (validation may be None) of at least these sizes."""
        raise NotImplementedError

    def setup(self, model: List[torch.nn.Module], iteration: int, run_dir: Path,
              datasets: Tuple[object, Optional[object]]) -> None:
        """Called once after the model is built, its weights loaded (``iteration`` > 0 on
        resume) and the datasets built, before the first step (e.g. reference log-probs)."""

    def before_step(self, iterators: List[Iterator[Batch]], num_microbatches: int,
                    training: bool) -> List[Iterator[Batch]]:
        """The iterators (one per model chunk) the schedule consumes for one global batch.

        Runs before every training step and every validation batch; a stage may read its
        ``num_microbatches`` micro-batches ahead and complete them (reference log-probs,
        rollouts). Default: the data as it comes.
        """
        return iterators

    def restart_data(self) -> None:
        """The loop replaced the training data iterators (a rollback to an earlier checkpoint):
        forget anything read ahead of them (GRPO's rollouts not trained on yet)."""

    def scheduled_microbatches(self, num_microbatches: int) -> int:
        """How many micro-batches the iterators of the last :meth:`before_step` hold: a stage that
        builds them by a token budget (GRPO) sets its own count. Default: ``num_microbatches``."""
        return num_microbatches

    def forward_step(self, model: torch.nn.Module, batch: Batch,
                     packed_seq_params: Optional[PackedSeqParams] = None) -> Tuple[torch.Tensor, LossFunc]:
        """One micro-batch through one model chunk: megatron's (output, loss_func).

        The batch is on the device, packed into one THD row when its sequences carry
        ``cu_seqlens`` (then ``packed_seq_params`` describes them), with ``position_ids`` and
        only this context-parallel rank's positions (:func:`~megatron_qwen.training.step.prepare_micro_batch`).
        """
        raise NotImplementedError

    def window_tokens(self, metrics: Optional[Dict[str, float]], steps: int, applied: int) -> float:
        """Tokens a log window of ``steps`` steps (``applied`` of them applied; ``metrics`` its means,
        None if none applied) trained on over all data-parallel ranks: the trainer's ``tokens_per_s``.

        Default: every sample's ``rows_per_sample`` rows of ``train.seq_length`` positions per step,
        the padding of SFT and DPO rows included (the model computes it). GRPO counts its packed tokens.
        """
        t = self.cfg.train
        return steps * t.global_batch_size * self.rows_per_sample * t.seq_length

    def train_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The stage's entries of a ``metrics.jsonl`` record (must include ``loss``)."""
        return dict(metrics)

    def eval_record(self, metrics: Dict[str, float]) -> Dict[str, float]:
        """The stage's entries of an ``eval.jsonl`` record."""
        return dict(metrics)
