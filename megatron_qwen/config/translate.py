"""Pure translation of our config into megatron-core's config objects.

Qwen2.5's architecture constants live here (like Megatron-Bridge's Qwen2 provider);
sizes come from ``conf/model``. OmegaConf cannot hold dtypes or callables, so this
module owns them.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.distributed import DistributedDataParallelConfig
from megatron.core.optimizer import OptimizerConfig
from megatron.core.transformer import TransformerConfig

from megatron_qwen.config.long_context import apply_yarn, long_context_kwargs
from megatron_qwen.config.memory import grad_bytes
from megatron_qwen.config.params import moe_layer_pattern
from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import micro_batch_tokens
from megatron_qwen.config import features as installed
from megatron_qwen.config import userbuffers
from megatron_qwen.config.features import Features

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TE_CROSS_ENTROPY = "2.0"  # transformer_engine.pytorch.cross_entropy.parallel_cross_entropy
MIB = 1 << 20


def params_dtype(cfg: Config) -> torch.dtype:
    """The dtype model parameters are held in."""
    return _DTYPES[cfg.precision.dtype]


def _recompute_kwargs(cfg: Config) -> dict:
    mode = cfg.parallel.recompute
    if mode == "none":
        return {}
    if mode == "selective":
        return {"recompute_granularity": "selective"}
    return {
        "recompute_granularity": "full",
        "recompute_method": "uniform",
        "recompute_num_layers": cfg.parallel.recompute_num_layers,
    }


def _fp8_kwargs(cfg: Config) -> dict:
    """FP8 through Transformer Engine, as Megatron-Bridge's H100 FP8 recipes set it."""
    pr = cfg.precision
    if pr.fp8 is None:
        return {}
    kwargs = {
        "fp8": "hybrid",  # E4M3 forward, E5M2 gradients
        "fp8_recipe": pr.fp8,
        "fp8_amax_history_len": pr.fp8_amax_history_len,
        "fp8_amax_compute_algo": pr.fp8_amax_compute_algo,
        "fp8_param": fp8_param_gather(cfg),
    }
    if pr.fp8 == "tensorwise" and pr.fp8_first_last_layers_bf16:
        # Current scaling keeps the first and last layer in bf16 (the most sensitive ones).
        kwargs.update(first_last_layers_bf16=True, num_layers_at_start_in_bf16=1, num_layers_at_end_in_bf16=1)
    return kwargs


def fp8_param_gather(cfg: Config) -> bool:
    """Whether weights are kept and all-gathered in FP8: delayed and tensorwise scaling with the
    distributed optimizer (megatron gathers FP8 params only there); blockwise keeps bf16 weights."""
    pr = cfg.precision
    return (pr.fp8 in ("delayed", "tensorwise") and pr.fp8_param_gather
            and cfg.parallel.use_distributed_optimizer)


def _fusion_kwargs(cfg: Config, features: Features) -> dict:
    """Kernel fusions. The first three are megatron's own PyTorch code (torch.compile'd on GPU),
    exact on every device; the others need a kernel that only Transformer Engine or apex ship,
    and megatron raises at model build when it is missing, so each follows its import."""
    on = cfg.train.fusions
    return {
        "bias_activation_fusion": on,  # SwiGLU as one autograd function: saves only its input
        "bias_dropout_fusion": on,
        # Vocab-parallel cross-entropy in one function with one all-reduce. NOTE: bf16 only:
        # megatron-core 0.16.1's native fused version casts the logits gradient to bf16, which
        # in an fp32 run changed the gradients by 6e-4 (relative norm; unfused: exact).
        "cross_entropy_loss_fusion": on and params_dtype(cfg) == torch.bfloat16,
        # Transformer Engine's kernel where it imports (Megatron-Bridge's performance recipes).
        "cross_entropy_fusion_impl": "te" if features.te_at_least(TE_CROSS_ENTROPY) else "native",
        "gradient_accumulation_fusion": gradient_accumulation_fusion(cfg, features),
        "apply_rope_fusion": on and features.te_at_least("1.4"),
        # No effect on our specs (SDPA or TE attention fuse the softmax themselves) and on
        # RMSNorm; set for megatron's own attention / LayerNorm when the kernels exist.
        "masked_softmax_fusion": on and features.softmax_kernels,
        "persist_layer_norm": on and features.apex_persist_ln,
    }


def gradient_accumulation_fusion(cfg: Config, features: Features) -> bool:
    """Weight gradients accumulated into the fp32 main grad inside the GEMM (apex's kernel)."""
    return cfg.train.fusions and features.apex_wgrad


def defer_embedding_wgrad(cfg: Config, features: Features) -> bool:
    """The output layer's wgrad deferred into the pipeline flush; megatron runs it only through
    the fused gradient accumulation, so without apex's kernel it stays off (cluster=slurm_h100
    refuses that case in :func:`validate.check_fast_path`)."""
    return cfg.parallel.defer_embedding_wgrad and gradient_accumulation_fusion(cfg, features)


def tp_comm_overlap(cfg: Config, features: Features) -> bool:
    """TP communication overlapped with GEMMs (TE userbuffers): TP > 1 with sequence parallel."""
    return userbuffers.overlap_applies(cfg.parallel) and features.te_userbuffers


def userbuffer_kwargs(cfg: Config) -> dict:
    """Transformer Engine's ``initialize_ub`` arguments but the quantization modes (an enum of TE's):
    buffers for one micro-batch's [seq / cp * rows, hidden] activations (:mod:`config.shapes`),
    the per-GEMM settings ``parallel.tp_comm_overlap_cfg`` picks (:mod:`config.userbuffers`),
    bootstrapped over NCCL."""
    return {"shape": [micro_batch_tokens(cfg), cfg.model.hidden_size], "tp_size": cfg.parallel.tp,
            "ub_cfgs": userbuffers.select(cfg).ub_cfgs, "bootstrap_backend": "nccl"}


def _overlap_kwargs(cfg: Config, features: Features) -> dict:
    """Communication overlap and pipeline memory switches (pure PyTorch unless noted)."""
    interleaved = cfg.parallel.vpp is not None
    return {
        # Frees each stage's output once sent downstream (only its shape is kept for backward).
        "deallocate_pipeline_outputs": True,
        # The interleaved schedule can overlap its sends/receives with compute, unbatched.
        "overlap_p2p_comm": interleaved,
        **({"batch_p2p_comm": False} if interleaved else {}),
        "tp_comm_overlap": tp_comm_overlap(cfg, features),
        "defer_embedding_wgrad_compute": defer_embedding_wgrad(cfg, features),
        "wgrad_deferral_limit": cfg.parallel.wgrad_deferral_limit,
    }


def _moe_kwargs(cfg: Config, features: Features) -> dict:
    """Qwen2-MoE in megatron-core's MoE layer.

    Hugging Face's Qwen2MoeSparseMoeBlock takes a softmax over all expert logits, keeps
    the top-k probabilities and renormalizes them only if ``norm_topk_prob``. megatron's
    ``moe_router_pre_softmax=True`` is exactly softmax-then-top-k; ``False`` takes a
    softmax over the top-k logits, which equals the renormalized variant.
    """
    m, p = cfg.model, cfg.parallel
    if m.num_experts is None:
        return {}
    return {
        "num_moe_experts": m.num_experts,
        "moe_ffn_hidden_size": m.moe_ffn_hidden_size,
        "moe_router_topk": m.moe_router_topk,
        "moe_router_score_function": "softmax",
        "moe_router_pre_softmax": not m.moe_norm_topk_prob,
        # Router logits and probabilities in fp32 even when training in bf16.
        "moe_router_dtype": "fp32",
        "moe_shared_expert_intermediate_size": m.moe_shared_expert_ffn_hidden_size,
        "moe_shared_expert_gate": m.moe_shared_expert_gate,
        "moe_layer_freq": moe_layer_pattern(m),
        "moe_router_load_balancing_type": "aux_loss",
        "moe_aux_loss_coeff": m.moe_aux_loss_coeff,
        "moe_z_loss_coeff": m.moe_z_loss_coeff,
        "moe_expert_capacity_factor": m.moe_capacity_factor,
        "moe_token_drop_policy": m.moe_token_drop_policy,
        "moe_pad_expert_input_to_capacity": m.moe_pad_to_capacity,
        "moe_token_dispatcher_type": "alltoall",
        # Grouped GEMM needs Transformer Engine's grouped linear (the GPU path); without it
        # the local spec runs the experts one after another (SequentialMLP).
        "moe_grouped_gemm": features.te,
        # Transformer Engine's fused token permutation (TE >= 2.1) and top-k routing (TE >= 2.7).
        "moe_permute_fusion": cfg.train.fusions and features.te_at_least("2.1"),
        "moe_router_fusion": cfg.train.fusions and features.te_at_least("2.7"),
        "expert_model_parallel_size": p.ep,
        "expert_tensor_parallel_size": p.etp or p.tp,
    }


def to_transformer_config(cfg: Config, features: Optional[Features] = None) -> TransformerConfig:
    """Builds megatron-core's ``TransformerConfig`` for a validated config.

    ``features``: what imports (default: this process's, :func:`features.detect`).
    """
    config = TransformerConfig(**transformer_config_kwargs(cfg, features))
    apply_yarn(config, cfg)
    return config


def transformer_config_kwargs(cfg: Config, features: Optional[Features] = None) -> dict:
    """The arguments of :func:`to_transformer_config`: a pure function of the config and
    ``features``. Kept separate because ``TransformerConfig.__post_init__`` imports the
    Transformer Engine kernels a switch names, so only the arguments can be checked on CPU."""
    features = installed.detect() if features is None else features
    m, p = cfg.model, cfg.parallel
    dtype = params_dtype(cfg)
    kwargs = dict(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.head_dim,
        # Qwen2.5 constants: RMSNorm, SwiGLU, QKV bias only (dropout 0 unless configured).
        normalization="RMSNorm",
        layernorm_epsilon=m.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=True,
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_method_std,
        # megatron's own init also sets the TP partition attributes that clipping and
        # init_weights rely on; megatron_qwen.model.init then overwrites the values so that
        # they do not depend on the layout.
        perform_initialization=True,
        # Loss is summed per token and divided by the global token count once, so that
        # every DP/PP/micro-batch split gives the same loss and gradients.
        calculate_per_token_loss=True,
        tensor_model_parallel_size=p.tp,
        pipeline_model_parallel_size=p.pp,
        virtual_pipeline_model_parallel_size=p.vpp,
        num_layers_in_first_pipeline_stage=p.pp_first_stage_layers,
        num_layers_in_last_pipeline_stage=p.pp_last_stage_layers,
        pipeline_model_parallel_layout=p.pp_layout,
        context_parallel_size=p.cp,
        sequence_parallel=p.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        **_recompute_kwargs(cfg),
        **_fp8_kwargs(cfg),
        **_fusion_kwargs(cfg, features),
        **_overlap_kwargs(cfg, features),
        **_moe_kwargs(cfg, features),
    )
    kwargs.update(long_context_kwargs(cfg, features))
    return kwargs


def to_ddp_config(cfg: Config) -> DistributedDataParallelConfig:
    """Builds megatron's DDP config (grad buckets, overlap, distributed optimizer)."""
    p = cfg.parallel
    return DistributedDataParallelConfig(
        grad_reduce_in_fp32=cfg.precision.grad_reduce_in_fp32,
        overlap_grad_reduce=p.overlap_grad_reduce,
        bucket_size=None if p.ddp_bucket_mb is None else int(p.ddp_bucket_mb * MIB) // grad_bytes(cfg),
        overlap_param_gather=p.overlap_param_gather,
        # Under the interleaved schedule all stages start their parameter all-gathers together
        # (megatron's schedule calls config.param_sync_func, which build_optimizer sets).
        align_param_gather=p.overlap_param_gather and p.vpp is not None,
        use_distributed_optimizer=p.use_distributed_optimizer,
        fp8_param_gather=fp8_param_gather(cfg),
        average_in_collective=False,  # per-token loss: grads are summed, then scaled once
    )


def to_optimizer_config(cfg: Config) -> OptimizerConfig:
    """Builds megatron's optimizer config (AdamW, clipping, mixed precision)."""
    o, pr = cfg.optim, cfg.precision
    dtype = _DTYPES[pr.dtype]
    return OptimizerConfig(
        optimizer="adam",  # decoupled weight decay: AdamW
        lr=o.lr,
        min_lr=o.min_lr,
        weight_decay=o.weight_decay,
        adam_beta1=o.adam_beta1,
        adam_beta2=o.adam_beta2,
        adam_eps=o.adam_eps,
        clip_grad=o.clip_grad,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        params_dtype=dtype,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer,
        overlap_param_gather=cfg.parallel.overlap_param_gather,
        overlap_param_gather_with_optimizer_step=cfg.parallel.overlap_param_gather_with_optimizer_step,
    )


# What the run log and the dry run show of the translated configs: the switches that decide speed.
_SHOWN = ("gradient_accumulation_fusion", "cross_entropy_loss_fusion", "cross_entropy_fusion_impl",
          "apply_rope_fusion", "tp_comm_overlap", "overlap_p2p_comm", "defer_embedding_wgrad_compute",
          "pipeline_model_parallel_layout", "fp8", "fp8_recipe")


def format_switches(cfg: Config, features: Optional[Features] = None) -> str:
    """One line of the resolved throughput switches (after what imports has been taken into
    account), e.g. ``switches: spec=te, gradient_accumulation_fusion=True, ...``."""
    features = installed.detect() if features is None else features
    kwargs = transformer_config_kwargs(cfg, features)
    shown = {"spec": "te" if features.te else "local", **{k: kwargs.get(k) for k in _SHOWN}}
    ddp = to_ddp_config(cfg)
    shown.update(grad_reduce_in_fp32=ddp.grad_reduce_in_fp32, overlap_grad_reduce=ddp.overlap_grad_reduce,
                 overlap_param_gather=ddp.overlap_param_gather, bucket_size=ddp.bucket_size,
                 overlap_param_gather_with_optimizer_step=cfg.parallel.overlap_param_gather_with_optimizer_step)
    if userbuffers.overlap_applies(cfg.parallel):  # what TE gets where its userbuffers import
        shown["tp_comm_overlap_cfg"] = userbuffers.select(cfg).name
    return "switches: " + ", ".join(f"{k}={v}" for k, v in shown.items())
