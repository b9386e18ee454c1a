"""One optimizer step and evaluation on megatron schedules, for any :class:`~megatron_qwen.training.stage.Stage`."""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.model.context_parallel import split_batch_for_this_rank
from megatron_qwen.platform import collectives
from megatron_qwen.platform.device import current_device
from megatron_qwen.training.resilience.guard import optimizer_step

if TYPE_CHECKING:
    from megatron_qwen.training.stage import Stage

Metrics = Dict[str, torch.Tensor]  # name -> [sum, count]


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


def prepare_micro_batch(batch: Dict[str, torch.Tensor]) -> Tuple[Dict[str, torch.Tensor], Optional[PackedSeqParams]]:
    """A micro-batch as a stage's forward step receives it: packed (THD), with global position
    ids, this context-parallel rank's share of every per-position tensor, on the device.

    Packing and the CP split run on the host copy, so their index arithmetic (max_seqlen,
    sub-sequence bounds) costs no device sync.
    """
    batch, packed = pack_micro_batch(batch)
    tokens = batch["tokens"]
    if tokens.dim() == 2 and batch.get("position_ids") is None:  # [b, s] rows (a DPO batch is [b, 2, s])
        batch["position_ids"] = torch.arange(tokens.shape[1]).expand_as(tokens)
    batch = split_batch_for_this_rank(batch, packed)  # [b, s/cp]
    return _to_device(batch, packed, current_device())


def _schedule_step(stage: Stage):
    """megatron's forward_step_func: the next micro-batch, prepared, through ``stage``."""
    def forward_step(data_iterator, model: torch.nn.Module):
        batch, packed_seq_params = prepare_micro_batch(next(data_iterator))
        return stage.forward_step(model, batch, packed_seq_params)
    return forward_step


def sum_metrics(losses: List[Metrics]) -> Optional[Metrics]:
    """This rank's ``[sum, count]`` of every metric over the micro-batches, left on the device.

    Only the last pipeline stage holds metrics; other stages return None.
    """
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    totals: Metrics = {}
    for item in losses:
        for name, value in item.items():
            value = value.to(current_device())
            totals[name] = totals[name] + value if name in totals else value.clone()
    return totals


def global_means(totals: Optional[Metrics]) -> Optional[Dict[str, float]]:
    """``sum / count`` of each metric over data-parallel ranks: one all-reduce, one host sync.

    Collective over the DP x CP group of the last pipeline stage; None on other stages.
    """
    if totals is None:
        return None
    names = sorted(totals)
    stacked = torch.stack([totals[name] for name in names]) if names else torch.zeros(0, 2, device=current_device())
    collectives.all_reduce(stacked, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return dict(zip(names, (stacked[:, 0] / stacked[:, 1].clamp(min=1)).tolist()))


def run_microbatches(stage: Stage, model: List[torch.nn.Module], iterators: List, num_microbatches: int,
                     seq_length: int, micro_batch_size: int, forward_only: bool) -> List[Metrics]:
    """One global batch through megatron's schedule (no-pipelining, 1F1B or interleaved, by layout),
    after the stage's :meth:`~Stage.before_step`."""
    iterators = stage.before_step(iterators, num_microbatches, training=not forward_only)
    num_microbatches = stage.scheduled_microbatches(num_microbatches)
    return get_forward_backward_func()(
        forward_step_func=_schedule_step(stage),
        data_iterator=iterators if len(iterators) > 1 else iterators[0],
        model=model if len(model) > 1 else model[0],
        num_microbatches=num_microbatches,
        seq_length=seq_length,
        micro_batch_size=micro_batch_size * stage.rows_per_sample,
        forward_only=forward_only,
    )


def train_step(stage: Stage, model, optimizer, scheduler, iterators, num_microbatches: int, seq_length: int,
               micro_batch_size: int) -> Tuple[Optional[Metrics], float, bool]:
    """One global batch: forward/backward over all micro-batches, then the optimizer step.

    Returns (this rank's metric sums on the device on the last PP stage, else None; grad norm;
    whether the step was applied: not when the grad norm is NaN/Inf). Nothing is synced here:
    the loop reduces the metrics at log intervals. (The grad norm, used for clipping, is the
    one host sync per step.)
    """
    for chunk in model:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    losses = run_microbatches(stage, model, iterators, num_microbatches, seq_length, micro_batch_size, False)
    applied, grad_norm = optimizer_step(optimizer)
    if applied:
        scheduler.step(increment=1)
    return sum_metrics(losses), grad_norm, applied


@contextlib.contextmanager
def eval_mode(chunks: List[torch.nn.Module]) -> Iterator[None]:
    """Model chunks in eval mode (no dropout) and no autograd inside; each chunk back in its own mode afterwards."""
    modes = [chunk.training for chunk in chunks]
    for chunk in chunks:
        chunk.eval()
    try:
        # NOTE: inside the generator body: ``@torch.no_grad()`` on a @contextmanager factory
        # disables grad only while the context-manager object is created, not in the with-body.
        with torch.no_grad():
            yield
    finally:
        for chunk, mode in zip(chunks, modes):
            chunk.train(mode)


def evaluate(stage: Stage, model, make_iterators: Callable[[], List], eval_iters: int, num_microbatches: int,
             seq_length: int, micro_batch_size: int) -> Optional[Dict[str, float]]:
    """Validation metrics over ``eval_iters`` global batches (the same batches every time)."""
    losses: List[Metrics] = []
    with eval_mode(model):
        iterators = make_iterators()
        for _ in range(eval_iters):
            losses += run_microbatches(stage, model, iterators, num_microbatches, seq_length, micro_batch_size, True)
    return global_means(sum_metrics(losses))
