"""Forward step, loss, one optimizer step and evaluation on megatron schedules."""

from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.platform.device import current_device
from megatron_qwen.training.guard import optimizer_step


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
    device = current_device()
    # Packing runs on the host copy, so its max_seqlen costs no device sync.
    batch, packed_seq_params = _to_device(*pack_micro_batch(next(data_iterator)), device)
    tokens = batch["tokens"]  # [b, s]
    position_ids = batch.get("position_ids")
    if position_ids is None:
        position_ids = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
    output = model(tokens, position_ids, batch.get("attention_mask"), labels=batch["labels"],
                   packed_seq_params=packed_seq_params)  # [b, s] per-token loss
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
    None; grad norm; whether the step was applied: not when the grad norm is NaN/Inf). The
    loss is not synced here: the loop reduces it at log intervals. (The grad norm, used
    for clipping, is the one host sync per step.)
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_microbatches(model, iterators, num_microbatches, seq_length, micro_batch_size, False)
    applied, grad_norm = optimizer_step(optimizer)
    if applied:
        scheduler.step(increment=1)
    return sum_losses(losses), grad_norm, applied


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
