"""Model wrapping, optimizer and LR schedule from megatron-core."""

from __future__ import annotations

from typing import List

import torch
from megatron.core.distributed import DistributedDataParallel, finalize_model_grads
from megatron.core.optimizer import get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer.module import Float16Module

from megatron_qwen.config.schema import Config
from megatron_qwen.config.translate import to_ddp_config, to_optimizer_config

_DECAY_STYLES = {"cosine": "cosine", "linear": "linear", "constant": "constant", "wsd": "WSD"}


def wrap_model(cfg: Config, model: List[torch.nn.Module]) -> List[DistributedDataParallel]:
    """Float16Module for bf16/fp16, then megatron DDP (one grad buffer per chunk)."""
    config = model[0].config
    if cfg.precision.dtype != "fp32":
        model = [Float16Module(config, chunk) for chunk in model]
    ddp_config = to_ddp_config(cfg)
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk,
                                disable_bucketing=i > 0)  # only the first chunk overlaps buckets
        for i, chunk in enumerate(model)
    ]


def build_optimizer(cfg: Config, model: List[DistributedDataParallel]):
    """megatron optimizer (distributed when configured) with the schedule hooks wired."""
    optimizer = get_megatron_optimizer(to_optimizer_config(cfg), model)
    config = model[0].config
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    if cfg.parallel.overlap_grad_reduce:
        no_sync = [chunk.no_sync for chunk in model]
        config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    if cfg.parallel.overlap_param_gather:
        config.param_sync_func = [chunk.start_param_sync for chunk in model]
        config.param_sync_func = config.param_sync_func[0] if len(model) == 1 else config.param_sync_func
    return optimizer


def build_scheduler(cfg: Config, optimizer, train_iters: int) -> OptimizerParamScheduler:
    """Warmup then cosine / linear / constant / WSD decay, stepped once per iteration."""
    o = cfg.optim
    return OptimizerParamScheduler(
        optimizer,
        init_lr=0.0,
        max_lr=o.lr,
        min_lr=o.min_lr,
        lr_warmup_steps=o.warmup_iters,
        lr_decay_steps=o.lr_decay_iters or train_iters,
        lr_decay_style=_DECAY_STYLES[o.decay_style],
        start_wd=o.weight_decay,
        end_wd=o.weight_decay,
        wd_incr_steps=train_iters,
        wd_incr_style="constant",
        wsd_decay_steps=o.wsd_decay_iters,
        lr_wsd_decay_style=o.wsd_decay_style,
    )
