"""megatron-core parallel state: the one place the layout is applied."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_qwen.config.schema import Config


def init_model_parallel(cfg: Config) -> None:
    """Creates TP/PP/VPP/CP/EP/DP groups for a validated config and seeds RNG trackers."""
    p = cfg.parallel
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        context_parallel_size=p.cp,
        expert_model_parallel_size=p.ep,
        expert_tensor_parallel_size=p.etp,
    )
    seed = cfg.train.seed + 100 * parallel_state.get_pipeline_model_parallel_rank()
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def destroy() -> None:
    """Tears down megatron's groups and the process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
