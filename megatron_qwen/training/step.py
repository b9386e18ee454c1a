"""Forward step, loss, one optimizer step and evaluation on megatron schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.model.context_parallel import split_batch_for_this_rank
from megatron_qwen.platform.device import current_device


def loss_func(loss_mask: torch.Tensor, output_tensor: torch.Tensor):
    """Per-token loss sum; megatron divides by the global token count once (per-token loss).

    Returns ``(loss_sum, num_tokens, {"lm loss": [loss_sum, num_tokens]})``.
    """
    mask = loss_mask.reshape(-1).float()
    loss_sum = (output_tensor.float().reshape(-1) * mask).sum()  # output_tensor: [b, s]
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss_sum.detach().clone(), mask.sum()])
    return loss_sum, num_tokens, {"lm loss": report}


def pack_micro_batch(batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[PackedSeqParams]]:
    """THD packing for a micro-batch that carries ``cu_seqlens`` [b, k] (else unchanged, None).

    megatron's attention squeezes the batch dim for THD, so the rows [b, s] are laid end to end
    as one row [1, b*s] and their boundaries chained; repeated trailing entries (the padding of
    ``cu_seqlens`` to a fixed width) collapse, so no empty sequence reaches the kernels.
    """
    if "cu_seqlens" not in batch:
        return batch, None
    b, s = batch["tokens"].shape
    offsets = torch.arange(b, device=batch["cu_seqlens"].device)[:, None] * s
    cu = torch.unique_consecutive((batch["cu_seqlens"].long() + offsets).reshape(-1)).to(torch.int32)
    flat = {k: v.reshape(1, b * s) if v.shape[:2] == (b, s) else v for k, v in batch.items()}
    max_len = int((cu[1:] - cu[:-1]).max())
    return flat, PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=max_len, max_seqlen_kv=max_len)


def _to_device(batch: Dict[str, torch.Tensor], packed: Optional[PackedSeqParams],
               device: torch.device) -> Tuple[Dict[str, torch.Tensor], Optional[PackedSeqParams]]:
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    if packed is not None:
        cu = packed.cu_seqlens_q.to(device, non_blocking=True)
        packed = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=packed.max_seqlen_q, max_seqlen_kv=packed.max_seqlen_kv)
    return batch, packed


def forward_step(data_iterator, model: torch.nn.Module):
    """megatron schedule callback: one micro-batch through one model chunk."""
    # Packing and the CP split run on the host copy: their index arithmetic (max_seqlen,
    # sub-sequence bounds) costs no device sync.
    batch, packed_seq_params = pack_micro_batch(next(data_iterator))
    tokens = batch["tokens"]  # [b, s]
    if batch.get("position_ids") is None:
        batch["position_ids"] = torch.arange(tokens.shape[1]).expand_as(tokens)
    batch = split_batch_for_this_rank(batch, packed_seq_params)  # [b, s/cp]: this CP rank's share
    batch, packed_seq_params = _to_device(batch, packed_seq_params, current_device())
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   packed_seq_params=packed_seq_params)  # [b, s/cp] per-token loss
    return output, partial(loss_func, batch["loss_mask"])


def sum_losses(losses: List[Dict[str, torch.Tensor]]) -> Optional[torch.Tensor]:
    """This rank's ``[loss_sum, tokens]`` over the micro-batches, left on the device.

    Only the last pipeline stage holds losses; other stages return None.
    """
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.zeros(2, device=current_device())
    for item in losses:
        total += item["lm loss"].to(total.device)
    return total


def global_mean_loss(total: Optional[torch.Tensor]) -> Optional[float]:
    """Token-weighted mean of ``[loss_sum, tokens]`` over data-parallel ranks (one host sync).

    Collective over the DP x CP group of the last pipeline stage; None on other stages.
    """
    if total is None:
        return None
    total = total.clone()
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1].clamp(min=1)).item()


def run_microbatches(model: List[torch.nn.Module], iterators: List, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool) -> List[Dict]:
    """Runs megatron's schedule (no-pipelining, 1F1B or interleaved, chosen by layout)."""
    return get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size,
        forward_only=forward_only,
    )


def train_step(model, optimizer, scheduler, iterators, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> Tuple[Optional[torch.Tensor], float, bool]:
    """One global batch: forward/backward over all micro-batches, then the optimizer step.

    Returns (this rank's ``[loss_sum, tokens]`` on the device on the last PP stage, else
    None; grad norm; whether the step was applied). The loss is not synced here: the loop
    reduces it at log intervals. (megatron's optimizer itself syncs once per step for the
    grad norm used in clipping.)
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_microbatches(model, iterators, num_microbatches, seq_length, micro_batch_size, False)
    applied, grad_norm, _ = optimizer.step()
    if applied:
        scheduler.step(increment=1)
    return sum_losses(losses), float(grad_norm or 0.0), bool(applied)


@torch.no_grad()
def evaluate(model, make_iterators: Callable[[], List], eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> Optional[float]:
    """Mean validation loss over ``eval_iters`` global batches (the same batches every time)."""
    for chunk in model:
        chunk.eval()
    iterators = make_iterators()
    losses: List[Dict] = []
    for _ in range(eval_iters):
        losses += run_microbatches(model, iterators, num_microbatches, seq_length, micro_batch_size, True)
    for chunk in model:
        chunk.train()
    return global_mean_loss(sum_losses(losses))
