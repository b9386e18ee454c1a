"""megatron-core parallel state: the one place the layout is applied."""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

from megatron_qwen.config import features
from megatron_qwen.config.schema import Config
from megatron_qwen.config.translate import tp_comm_overlap, userbuffer_kwargs


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


def init_tp_comm_overlap(cfg: Config) -> None:
    """Allocates Transformer Engine's userbuffers when the translation turned on TP
    communication overlap (as Megatron-LM's ``_initialize_tp_communicators``), with the
    arguments of :func:`megatron_qwen.config.translate.userbuffer_kwargs` (buffer shape, per-GEMM
    settings) and the quantization modes of TE's own enum."""
    if not tp_comm_overlap(cfg, features.detect()):
        return
    from transformer_engine.pytorch import module as te_module

    pr = cfg.precision
    kwargs = userbuffer_kwargs(cfg)
    modes = getattr(te_module.base, "UserBufferQuantizationMode", None)  # TE >= 2.7
    if modes is None:
        kwargs["use_fp8"] = pr.fp8 is not None
    else:  # tensorwise FP8 with its first and last layer in bf16: both kinds of buffers (as Megatron-LM)
        bf16_ends = pr.fp8 == "tensorwise" and pr.fp8_first_last_layers_bf16
        kwargs["quantization_modes"] = [modes.NONE if pr.fp8 is None else modes.FP8] + (
            [modes.NONE] if bf16_ends else [])
    te_module.base.initialize_ub(**kwargs)


def destroy() -> None:
    """Tears down megatron's groups and the process group (safe to call twice)."""
    parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def adapt_to_backend(config) -> None:
    """Adjusts a TransformerConfig to the process-group backend in use.

    NOTE: gloo does not order the paired sends/receives of ``batch_isend_irecv``
    the way NCCL does: under the interleaved (VPP) schedule activations of different
    micro-batches were mixed up (loss drifted at micro-batch 3). Unbatched p2p is exact.
    gloo's ``isend`` also reads the tensor later, from its own thread: with overlapped p2p
    (VPP) megatron frees a stage's output right after issuing the send
    (``deallocate_pipeline_outputs``), and the loss changed from the first step. NCCL has
    enqueued the send on the stream by then, so both stay on with NCCL.
    """
    if torch.distributed.get_backend() == "gloo":
        config.batch_p2p_comm = False
        if config.overlap_p2p_comm:
            config.deallocate_pipeline_outputs = False
