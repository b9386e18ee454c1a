"""One early validation pass over the composed config.

Runs before any process group exists (it only needs the world size), so a bad layout
fails in seconds on a login node instead of minutes into a SLURM job. Every message
names the numbers involved and the override that fixes it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from typing import Dict, List, Optional, Tuple

from megatron_qwen.config import features as installed
from megatron_qwen.config.features import Features
from megatron_qwen.config.grpo import check_grpo
from megatron_qwen.config.long_context import check_long_context
from megatron_qwen.config.params import layout_stages, pipeline_stage_sizes
from megatron_qwen.config.rules import check
from megatron_qwen.config.schema import Config, ModelConfig, StageConfig
from megatron_qwen.config.userbuffers import config_problems as userbuffer_problems, overlap_applies
from megatron_qwen.errors import UserError

RECOMPUTE_MODES = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
DECAY_STYLES = ("cosine", "wsd", "linear", "constant")
MOE_DROP_POLICIES = ("probs", "position")
BACKENDS = (None, "nccl", "gloo")
DPO_LOSSES = ("sigmoid", "ipo")
DPO_REFERENCES = ("precompute", "model")
SPIKE_ACTIONS = ("none", "warn", "rollback")
WARMUP_CAP = 2000  # iterations; the default warmup of long runs (Qwen/Llama recipes use ~2000)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says why and how to fix it."""


_MODEL_SIZES = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                "vocab_size", "max_position_embeddings")
_MODEL_OPTIONAL_SIZES = ("kv_channels", "num_experts", "moe_ffn_hidden_size", "moe_shared_expert_ffn_hidden_size")


def model_problems(m: ModelConfig) -> List[str]:
    """What makes a model shape unbuildable (sizes below 1, GQA groups, odd head dim), one message each.

    The trainer's :func:`validate` and the converters (which read a checkpoint's model) share it.
    """
    errors = [f"model.{n}={getattr(m, n)} must be >= 1" for n in _MODEL_SIZES if getattr(m, n) < 1]
    errors += [f"model.{n}={getattr(m, n)} must be >= 1 (or null)" for n in _MODEL_OPTIONAL_SIZES
               if getattr(m, n) is not None and getattr(m, n) < 1]
    errors += [f"model.{n}={getattr(m, n)} must be > 0" for n in ("rms_norm_eps", "rope_theta", "init_method_std")
               if not 0 < getattr(m, n) < math.inf]
    errors += [f"model.{n}={getattr(m, n)} must be in [0, 1)" for n in ("hidden_dropout", "attention_dropout")
               if not 0 <= getattr(m, n) < 1]
    if errors:
        return errors
    check(errors, m.num_attention_heads % m.num_query_groups == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by "
           f"model.num_query_groups={m.num_query_groups} (each KV head serves a whole group of heads)")
    check(errors, m.head_dim % 2 == 0 and m.head_dim >= 2,
           f"the head dim {m.head_dim} (model.kv_channels, else hidden_size // num_attention_heads) must be even: "
           "RoPE rotates pairs of channels")
    return errors


def _check_layout(cfg: Config, world_size: int, errors: List[str]) -> int:
    """Checks world-size arithmetic and returns the data-parallel size."""
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "pp", "cp", "ep"):
        check(errors, getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
    if errors:
        return 1
    model_parallel = p.tp * p.pp * p.cp
    if world_size % model_parallel:
        errors.append(
            f"world size {world_size} is not divisible by tp*pp*cp = {p.tp}*{p.pp}*{p.cp} = "
            f"{model_parallel}; change the number of processes or parallel.tp/pp/cp"
        )
        return 1
    dp = world_size // model_parallel
    check(errors, p.dp in (None, dp),
           f"parallel.dp={p.dp} but world size {world_size} / (tp*pp*cp={model_parallel}) = {dp}; "
           "leave parallel.dp unset to derive it")
    check(errors, m.num_attention_heads % p.tp == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    check(errors, m.num_query_groups % p.tp == 0,
           f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
           f"parallel.tp={p.tp}; use a tp that divides {m.num_query_groups}")
    check(errors, m.vocab_size % p.tp == 0,
           f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}")
    _check_pipeline_split(cfg, errors)
    if p.vpp is not None:
        check(errors, p.vpp >= 2 and p.pp >= 2,
               f"parallel.vpp={p.vpp} needs vpp >= 2 and parallel.pp >= 2 (got pp={p.pp}); unset vpp")
    check(errors, not p.sp or p.tp > 1,
           "parallel.sp=true needs parallel.tp > 1 (sequence parallel splits along TP)")
    if p.sp:
        check(errors, cfg.train.seq_length % p.tp == 0,
               f"train.seq_length={cfg.train.seq_length} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    _check_experts(cfg, world_size, errors)
    return dp


def _check_pipeline_split(cfg: Config, errors: List[str]) -> None:
    """Layers must split evenly over pp*vpp stages, or as first/last + even rest."""
    p, m = cfg.parallel, cfg.model
    if p.pp_layout is not None:
        _check_pp_layout(cfg, errors)
        return
    if p.pp_first_stage_layers is None and p.pp_last_stage_layers is None:
        stages = p.pp * (p.vpp or 1)
        check(errors, m.num_layers % stages == 0,
               f"model.num_layers={m.num_layers} is not divisible by pp*vpp = {p.pp}*{p.vpp or 1} = {stages}; "
               "set parallel.pp_first_stage_layers / pp_last_stage_layers for an uneven split")
        return
    check(errors, p.pp > 1 and p.vpp is None,
           f"parallel.pp_first_stage_layers / pp_last_stage_layers need pp > 1 and no vpp (got pp={p.pp}, "
           f"vpp={p.vpp})")
    if errors:
        return
    sizes = pipeline_stage_sizes(m.num_layers, p.pp, p.pp_first_stage_layers, p.pp_last_stage_layers)
    check(errors, sum(sizes) == m.num_layers and min(sizes) >= 1,
           f"model.num_layers={m.num_layers} cannot be split over pp={p.pp} stages with "
           f"pp_first_stage_layers={p.pp_first_stage_layers}, pp_last_stage_layers={p.pp_last_stage_layers} "
           f"(the other stages would get {sizes[1:-1] or 'nothing'}): every stage needs >= 1 layer and the rest "
           "must divide evenly")


def _check_pp_layout(cfg: Config, errors: List[str]) -> None:
    """An explicit layout: pp*vpp virtual stages, every decoder layer once, E first and L last."""
    p, m = cfg.parallel, cfg.model
    stages = layout_stages(p.pp_layout)
    fix = "fix parallel.pp_layout or remove it"
    check(errors, p.pp > 1 and p.pp_first_stage_layers is None and p.pp_last_stage_layers is None,
           f"parallel.pp_layout needs pp > 1 and no pp_first/last_stage_layers (got pp={p.pp}); {fix}")
    check(errors, len(stages) == p.pp * (p.vpp or 1),
           f"parallel.pp_layout has {len(stages)} stages but pp*vpp = {p.pp}*{p.vpp or 1} = {p.pp * (p.vpp or 1)}; "
           f"{fix}")
    layers = sum(stage.count("t") for stage in stages)
    check(errors, layers == m.num_layers,
           f"parallel.pp_layout places {layers} decoder layers (t) but model.num_layers={m.num_layers}; {fix}")
    check(errors, set("".join(stages)) <= set("EtL") and stages[0].startswith("E") and stages[-1].endswith("L")
           and "".join(stages).count("E") == 1 and "".join(stages).count("L") == 1,
           f"parallel.pp_layout={p.pp_layout!r} must use only E, t, L, start with E (embedding) and end with L "
           f"(output layer); {fix}")


def _check_experts(cfg: Config, world_size: int, errors: List[str]) -> None:
    p, m = cfg.parallel, cfg.model
    if m.num_experts is None:
        check(errors, p.ep == 1, f"parallel.ep={p.ep} needs an MoE model (model.num_experts is unset)")
        check(errors, p.etp is None, f"parallel.etp={p.etp} needs an MoE model (model.num_experts is unset)")
        return
    check(errors, m.num_experts % p.ep == 0,
           f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}")
    etp = p.etp or p.tp
    expert_model_parallel = etp * p.ep * p.pp
    check(errors, world_size % expert_model_parallel == 0,
           f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{p.ep}*{p.pp} = {expert_model_parallel} "
           "(the expert data-parallel size is world / (etp*ep*pp))")
    check(errors, m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size % etp == 0,
           f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} must be set and divisible by etp={etp}")
    # megatron's MoE layer refuses TP without sequence parallel during training.
    check(errors, p.tp == 1 or p.sp,
           f"an MoE model at parallel.tp={p.tp} needs parallel.sp=true (sequence parallel)")
    _check_moe_routing(m, errors)


def _check_moe_routing(m: ModelConfig, errors: List[str]) -> None:
    check(errors, 1 <= m.moe_router_topk <= m.num_experts,
           f"model.moe_router_topk={m.moe_router_topk} must be in [1, num_experts={m.num_experts}]")
    check(errors, not (m.moe_router_topk == 1 and m.moe_norm_topk_prob),
           "model.moe_norm_topk_prob=true with moe_router_topk=1 gives every token probability 1 "
           "and a zero router gradient; set moe_norm_topk_prob=false")
    check(errors, 1 <= m.moe_layer_freq <= m.num_layers,
           f"model.moe_layer_freq={m.moe_layer_freq} must be in [1, num_layers={m.num_layers}] "
           "(every moe_layer_freq-th layer is MoE)")
    check(errors, not m.moe_shared_expert_gate or m.moe_shared_expert_ffn_hidden_size is not None,
           "model.moe_shared_expert_gate=true needs model.moe_shared_expert_ffn_hidden_size (the shared expert)")
    check(errors, m.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} must be >= 0")
    check(errors, m.moe_z_loss_coeff is None or m.moe_z_loss_coeff >= 0,
           f"model.moe_z_loss_coeff={m.moe_z_loss_coeff} must be >= 0 (or null)")
    check(errors, m.moe_capacity_factor is None or m.moe_capacity_factor > 0,
           f"model.moe_capacity_factor={m.moe_capacity_factor} must be > 0 (or null for no token dropping)")
    check(errors, m.moe_token_drop_policy in MOE_DROP_POLICIES,
           f"model.moe_token_drop_policy={m.moe_token_drop_policy!r} must be one of {MOE_DROP_POLICIES}")
    check(errors, not m.moe_pad_to_capacity or m.moe_capacity_factor is not None,
           "model.moe_pad_to_capacity=true needs model.moe_capacity_factor")


def _check_batch(cfg: Config, dp: int, errors: List[str]) -> None:
    t = cfg.train
    per_step = t.micro_batch_size * dp
    check(errors, t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    check(errors, t.global_batch_size >= 1, f"train.global_batch_size={t.global_batch_size} must be >= 1")
    check(errors, per_step > 0 and t.global_batch_size % per_step == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*dp = "
           f"{t.micro_batch_size}*{dp} = {per_step}")
    check(errors, (t.train_iters is None) != (t.train_samples is None),
           "set exactly one of train.train_iters and train.train_samples "
           f"(got train_iters={t.train_iters}, train_samples={t.train_samples})")
    check(errors, t.seq_length <= cfg.model.max_position_embeddings,
           f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    p = cfg.parallel
    if p.vpp is not None and per_step > 0 and t.global_batch_size % per_step == 0:
        microbatches = t.global_batch_size // per_step
        check(errors, microbatches % p.pp == 0,
               f"interleaved pipeline (vpp={p.vpp}) needs the number of micro-batches "
               f"{microbatches} (= global_batch_size / (micro_batch_size*dp)) divisible by pp={p.pp}")


def _at_least(errors: List[str], values: dict, low: int, optional: bool = False) -> None:
    """Each ``name: value`` must be >= ``low`` (or None when ``optional``)."""
    for name, value in values.items():
        check(errors, (optional and value is None) or (value is not None and value >= low),
               f"{name}={value} must be >= {low}" + (" (or null)" if optional else ""))


def _check_run(cfg: Config, errors: List[str]) -> None:
    """Lengths, intervals and counts the loop divides by or counts down (0 means off where it may)."""
    t, c, o = cfg.train, cfg.checkpoint, cfg.optim
    _at_least(errors, {"train.seq_length": t.seq_length, "logging.log_interval": cfg.logging.log_interval,
                       "checkpoint.keep_last": c.keep_last, "train.stop_check_interval": t.stop_check_interval,
                       "parallel.recompute_num_layers":
                       cfg.parallel.recompute_num_layers, "precision.fp8_amax_history_len":
                       cfg.precision.fp8_amax_history_len, "cluster.gpus_per_node": cfg.cluster.gpus_per_node}, 1)
    _at_least(errors, {"train.train_iters": t.train_iters, "train.train_samples": t.train_samples,
                       "checkpoint.save_interval": c.save_interval, "train.exit_interval": t.exit_interval,
                       "train.dry_run_world_size": t.dry_run_world_size, "optim.lr_decay_iters": o.lr_decay_iters,
                       "optim.wsd_decay_iters": o.wsd_decay_iters}, 1, optional=True)
    _at_least(errors, {"train.eval_interval": t.eval_interval, "train.eval_iters": t.eval_iters,
                       "data.num_workers": cfg.data.num_workers}, 0)
    _at_least(errors, {"optim.warmup_iters": o.warmup_iters}, 0, optional=True)
    for name in ("hang_timeout_s", "hang_startup_timeout_s"):
        value = getattr(t, name)
        check(errors, value is None or 0 < value < math.inf, f"train.{name}={value} must be > 0 (or null: off)")
    check(errors, t.exit_signal in signal.Signals.__members__,
           f"train.exit_signal={t.exit_signal!r} is not a signal name (e.g. SIGUSR1, SIGTERM)")
    ranges = {"optim.lr": (o.lr, o.lr > 0), "optim.adam_eps": (o.adam_eps, o.adam_eps > 0),
              "optim.weight_decay": (o.weight_decay, o.weight_decay >= 0), "optim.clip_grad": (o.clip_grad,
              o.clip_grad >= 0), "optim.adam_beta1": (o.adam_beta1, 0 <= o.adam_beta1 < 1),
              "optim.adam_beta2": (o.adam_beta2, 0 <= o.adam_beta2 < 1)}
    for name, (value, ok) in ranges.items():
        check(errors, ok and math.isfinite(value), f"{name}={value} is out of range (lr and adam_eps > 0, "
               "weight_decay and clip_grad >= 0, betas in [0, 1))")


def _check_precision_and_optim(cfg: Config, features: Features, errors: List[str]) -> None:
    pr, o, p = cfg.precision, cfg.optim, cfg.parallel
    check(errors, pr.dtype in DTYPES, f"precision.dtype={pr.dtype!r} must be one of {DTYPES}")
    if pr.fp8 is not None:
        check(errors, pr.fp8 in FP8_RECIPES, f"precision.fp8={pr.fp8!r} must be one of {FP8_RECIPES}")
        check(errors, features.te,
               f"precision.fp8={pr.fp8} needs Transformer Engine, which is not installed; "
               "use precision=bf16 or install Transformer Engine (NGC PyTorch containers ship it)")
        check(errors, pr.dtype == "bf16", f"precision.fp8 needs precision.dtype=bf16 (got {pr.dtype})")
        # megatron-core 0.16.1 raises deep in the model build for blockwise scaling on older TE.
        check(errors, pr.fp8 != "blockwise" or not features.te or features.te_at_least("2.3"),
               f"precision.fp8=blockwise needs Transformer Engine >= 2.3 (this one is {features.te_version}); "
               "use precision=fp8_tensorwise or a newer container")
    check(errors, pr.fp8_first_last_layers_bf16 or pr.fp8 == "tensorwise",
           f"precision.fp8_first_last_layers_bf16=false applies to precision.fp8=tensorwise only (got {pr.fp8}); "
           "remove the override")
    check(errors, p.recompute in RECOMPUTE_MODES,
           f"parallel.recompute={p.recompute!r} must be one of {RECOMPUTE_MODES}")
    check(errors, not p.overlap_param_gather or p.use_distributed_optimizer,
           "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    check(errors, pr.grad_reduce_in_fp32 or pr.dtype in ("bf16", "fp16"),
           f"precision.grad_reduce_in_fp32=false needs precision.dtype=bf16 or fp16 (got {pr.dtype}: the "
           "gradients are fp32 anyway); remove the override")
    _check_comm_switches(cfg, errors)
    check(errors, o.decay_style in DECAY_STYLES, f"optim.decay_style={o.decay_style!r} must be one of {DECAY_STYLES}")
    check(errors, 0.0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if o.decay_style == "wsd":
        check(errors, o.wsd_decay_iters is not None and o.wsd_decay_iters > 0,
               "optim.decay_style=wsd needs optim.wsd_decay_iters > 0 (length of the final decay)")
    decay = lr_decay_iters(cfg)
    if decay is not None and o.warmup_iters is not None:
        check(errors, o.warmup_iters < decay,
               f"optim.warmup_iters={o.warmup_iters} must be below the LR decay length {decay} "
               "(optim.lr_decay_iters, else the number of iterations); lower optim.warmup_iters")


def _check_comm_switches(cfg: Config, errors: List[str]) -> None:
    """The DDP / pipeline overlap switches megatron reads only in some layouts: refused elsewhere."""
    p, c = cfg.parallel, cfg.checkpoint
    if p.ddp_bucket_mb is not None:
        check(errors, p.ddp_bucket_mb > 0, f"parallel.ddp_bucket_mb={p.ddp_bucket_mb} must be > 0 (or null)")
        check(errors, p.overlap_grad_reduce,
               f"parallel.ddp_bucket_mb={p.ddp_bucket_mb} takes effect only with parallel.overlap_grad_reduce=true "
               "(otherwise megatron reduces the whole buffer at once); set it or remove ddp_bucket_mb")
    check(errors, not p.overlap_param_gather_with_optimizer_step
           or (p.use_distributed_optimizer and p.overlap_param_gather and p.vpp is not None),
           "parallel.overlap_param_gather_with_optimizer_step=true needs use_distributed_optimizer=true, "
           f"overlap_param_gather=true and an interleaved pipeline (got {p.use_distributed_optimizer}, "
           f"{p.overlap_param_gather}, vpp={p.vpp}); set those or remove the override")
    # NOTE: Megatron-LM refuses it with distributed checkpointing ("not supported ... yet"), and
    # Megatron-Bridge turns it on only in its benchmark recipes, which save nothing.
    check(errors, not p.overlap_param_gather_with_optimizer_step or (c.save_interval is None and not c.save_at_end),
           "parallel.overlap_param_gather_with_optimizer_step=true is for runs that save no checkpoint (megatron "
           f"does not support it with distributed checkpointing; got checkpoint.save_interval={c.save_interval}, "
           f"save_at_end={c.save_at_end}): set checkpoint.save_interval=null checkpoint.save_at_end=false or remove it")
    check(errors, not p.defer_embedding_wgrad or p.pp > 1,
           f"parallel.defer_embedding_wgrad=true needs parallel.pp > 1 (got pp={p.pp}): it fills the pipeline "
           "flush; remove the override")
    check(errors, p.wgrad_deferral_limit >= 0,
           f"parallel.wgrad_deferral_limit={p.wgrad_deferral_limit} must be >= 0 (0 = all micro-batches)")
    check(errors, p.wgrad_deferral_limit == 0 or p.defer_embedding_wgrad,
           f"parallel.wgrad_deferral_limit={p.wgrad_deferral_limit} is read only with "
           "parallel.defer_embedding_wgrad=true; set it or remove the limit")
    errors += userbuffer_problems(cfg)


def _check_cluster(cfg: Config, world_size: int, errors: List[str]) -> None:
    """Cluster settings, and what a job spanning several nodes needs."""
    c, p = cfg.cluster, cfg.parallel
    check(errors, c.backend in BACKENDS, f"cluster.backend={c.backend!r} must be one of {BACKENDS}")
    for name in ("gpus_per_node", "pg_timeout_minutes", "gpu_memory_gb", "checkpoint_write_gbps"):
        check(errors, getattr(c, name) > 0, f"cluster.{name}={getattr(c, name)} must be > 0")
    check(errors, c.peak_tflops is None or c.peak_tflops > 0,
           f"cluster.peak_tflops={c.peak_tflops} must be > 0 (the dense bf16 peak) or null to look it up")
    check(errors, c.max_requeues >= 0, f"cluster.max_requeues={c.max_requeues} must be >= 0 (0 = never after a failure)")
    check(errors, cfg.train.manual_gc_interval >= 0,
           f"train.manual_gc_interval={cfg.train.manual_gc_interval} must be >= 0 (0 = automatic GC)")
    check(errors, not c.allow_socket_transport or (c.backend != "gloo" and world_size > c.gpus_per_node),
           f"cluster.allow_socket_transport=true is read only by jobs whose NCCL spans nodes (got world size "
           f"{world_size}, cluster.gpus_per_node={c.gpus_per_node}, backend={c.backend}): remove the override")
    if c.gpus_per_node <= 0 or world_size <= c.gpus_per_node:
        return
    nodes = math.ceil(world_size / c.gpus_per_node)
    # NOTE: megatron builds a dataset's index cache on global rank 0 and the other ranks read it.
    check(errors, cfg.data.type == "mock" or cfg.data.cache_dir is not None,
           f"a {nodes}-node job (world size {world_size} > cluster.gpus_per_node={c.gpus_per_node}) needs "
           "data.cache_dir on a filesystem every node sees: rank 0 writes the dataset index cache there and "
           "the other nodes read it; set data.cache_dir=/shared/path (slurm/train.sbatch passes $CACHE_DIR "
           "and mounts it into the container)")
    check(errors, p.tp <= c.gpus_per_node,
           f"parallel.tp={p.tp} spans nodes (cluster.gpus_per_node={c.gpus_per_node}): tensor parallelism "
           f"communicates in every layer and needs NVLink; use parallel.tp <= {c.gpus_per_node} and parallel.pp "
           "across nodes")


# The stage.* settings each stage reads (the language-model stages read none); a setting another
# stage reads, changed from its default, is refused rather than silently ignored.
_REFERENCE = ("beta", "reference", "reference_load")
STAGE_SETTINGS: Dict[str, Tuple[str, ...]] = {
    "pretrain": (), "long_context": (), "sft": (),
    "dpo": ("loss", "label_smoothing", "sft_weight", "no_signal_warn_steps", *_REFERENCE),
    "grpo": ("group_size", "max_new_tokens", "temperature", "top_p", "clip_low", "clip_high", "advantage_std",
             "aggregation", "rewards", "updates_per_rollout", "max_tokens_per_microbatch", "no_signal_warn_steps",
             *_REFERENCE),
}


def _check_stage_settings(st: StageConfig, errors: List[str]) -> None:
    """Every changed stage.* setting is one ``stage.name`` reads."""
    read = STAGE_SETTINGS.get(st.name)
    if read is None:
        return  # an unknown stage name is refused when the stage is built (training/stages)
    default = StageConfig()
    for f in dataclasses.fields(StageConfig):
        value = getattr(st, f.name)
        if f.name == "name" or f.name in read or value == getattr(default, f.name):
            continue
        readers = [name for name, fields in STAGE_SETTINGS.items() if f.name in fields]
        errors.append(f"stage.{f.name}={value} is a setting of stage={'/'.join(readers)}, which stage={st.name} "
                      f"does not read: remove the override (or train stage={readers[0]})")


def _check_stage(cfg: Config, errors: List[str]) -> None:
    """Preference data and stage=dpo go together, prompts and stage=grpo; each one's own settings."""
    st, kind = cfg.stage, cfg.data.type
    _check_stage_settings(st, errors)
    check(errors, st.no_signal_warn_steps >= 1, f"stage.no_signal_warn_steps={st.no_signal_warn_steps} must be >= 1")
    check_grpo(cfg, errors)
    if st.name != "dpo":
        check(errors, kind != "preference",
               f"data.type=preference holds preference pairs, which stage={st.name} cannot train on; use stage=dpo")
        return
    check(errors, kind == "preference",
           f"stage=dpo needs preference data, but data.type={kind}; pick it with data=dpo_example (or another "
           "conf/data set of type preference)")
    check(errors, cfg.parallel.cp == 1,
           f"stage=dpo needs parallel.cp=1 (got {cfg.parallel.cp}): preference pairs are short sequences and the "
           "context-parallel split is implemented for the language-model stages only")
    check(errors, st.loss in DPO_LOSSES, f"stage.loss={st.loss!r} must be one of {DPO_LOSSES}")
    check(errors, st.beta > 0, f"stage.beta={st.beta} must be > 0")
    check(errors, 0.0 <= st.label_smoothing < 0.5,
           f"stage.label_smoothing={st.label_smoothing} must be in [0, 0.5)")
    check(errors, st.label_smoothing == 0.0 or st.loss == "sigmoid",
           f"stage.label_smoothing={st.label_smoothing} applies to stage.loss=sigmoid only (got {st.loss})")
    check(errors, st.sft_weight >= 0, f"stage.sft_weight={st.sft_weight} must be >= 0")
    check(errors, st.reference in DPO_REFERENCES,
           f"stage.reference={st.reference!r} must be one of {DPO_REFERENCES}")


def _check_domains(cfg: Config, errors: List[str]) -> None:
    """Blend entries name the per-domain validation metrics (val_loss/<name>): distinct, non-empty, no '/'."""
    for setting, entries in (("data.blend", cfg.data.blend), ("data.valid_blend", cfg.data.valid_blend or [])):
        names = [entry.domain for entry in entries]
        for i, name in enumerate(names):
            check(errors, bool(name) and "/" not in name,
                  f"{setting}[{i}].name={name!r} must be non-empty without '/' (it names val_loss/<name>)")
        twice = sorted({name for name in names if names.count(name) > 1})
        check(errors, not twice, f"{setting} names domain(s) {', '.join(twice)} more than once; give the entries "
              f"distinct name: fields (they name val_loss/<name>)")


def _check_eval_tasks(cfg: Config, errors: List[str]) -> None:
    """lm-eval during training: an interval for the tasks, no interval or limit without them, and a
    layout the adapter runs at (one model chunk per rank, whole sequences on each rank)."""
    t, p = cfg.train, cfg.parallel
    if not t.eval_tasks:
        for name in ("eval_tasks_interval", "eval_tasks_limit"):
            check(errors, getattr(t, name) is None,
                  f"train.{name}={getattr(t, name)} is set but train.eval_tasks is empty; name tasks "
                  f"(train.eval_tasks=[arith_choice]) or unset it")
        return
    _at_least(errors, {"train.eval_tasks_interval": t.eval_tasks_interval}, 1)
    _at_least(errors, {"train.eval_tasks_limit": t.eval_tasks_limit}, 1, optional=True)
    check(errors, not p.vpp and p.cp == 1 and not p.sp,
          f"train.eval_tasks runs lm-eval with one model chunk per rank and whole rows: set parallel.vpp=null, "
          f"parallel.cp=1 and parallel.sp=false (got vpp={p.vpp}, cp={p.cp}, sp={str(p.sp).lower()}), or "
          f"evaluate the checkpoints with tools/evaluate.py")


def _check_failure_handling(cfg: Config, errors: List[str]) -> None:
    t, s = cfg.train, cfg.train.loss_spike
    check(errors, t.max_skipped_consecutive >= 1,
           f"train.max_skipped_consecutive={t.max_skipped_consecutive} must be >= 1")
    check(errors, s.action in SPIKE_ACTIONS, f"train.loss_spike.action={s.action!r} must be one of {SPIKE_ACTIONS}")
    for name in ("nan_grad_at_steps", "spike_batch_at_steps"):
        steps = getattr(cfg.debug, name)
        check(errors, all(step >= 1 for step in steps), f"debug.{name}={list(steps)}: steps count from 1")
    if s.action == "none":
        return
    check(errors, s.factor is not None or s.zscore is not None,
           f"train.loss_spike.action={s.action} needs train.loss_spike.factor (e.g. 1.5) or .zscore (e.g. 6)")
    check(errors, s.factor is None or s.factor > 1, f"train.loss_spike.factor={s.factor} must be > 1")
    check(errors, s.zscore is None or s.zscore > 0, f"train.loss_spike.zscore={s.zscore} must be > 0")
    check(errors, 2 <= s.min_history <= s.window,
           f"train.loss_spike.min_history={s.min_history} must be in [2, window={s.window}]")
    check(errors, s.skip_batches >= 1 and s.max_rollbacks >= 1,
           f"train.loss_spike.skip_batches={s.skip_batches} and max_rollbacks={s.max_rollbacks} must be >= 1")
    check(errors, s.action != "rollback" or bool(cfg.checkpoint.save_interval),
           "train.loss_spike.action=rollback needs checkpoints to roll back to: set checkpoint.save_interval")


def missing_fast_path(cfg: Config, features: Features) -> List[str]:
    """The fast-path libraries this config would use on a GPU that do not import here."""
    p = cfg.parallel
    missing = [] if features.te else ["Transformer Engine (transformer_engine.pytorch)"]
    if cfg.train.fusions and not features.apex_wgrad:
        missing.append("apex's fused gradient accumulation (fused_weight_gradient_mlp_cuda)")
    if overlap_applies(p) and not features.te_userbuffers:
        missing.append("Transformer Engine userbuffers (TE >= 1.9, for parallel.tp_comm_overlap)")
    if not features.fused_adam:
        missing.append("a fused Adam (transformer_engine.pytorch.optimizers or apex.optimizers)")
    return missing


def check_fast_path(cfg: Config, features: Optional[Features] = None) -> None:
    """With ``cluster.require_fast_path``, refuses to start a run whose fast kernels do not import.

    Separate from :func:`validate` because a plan (``train.dry_run``) on a login node without
    GPU libraries is still a valid plan; :func:`megatron_qwen.train.run` calls it before training.

    Raises:
        ConfigError: one line naming what is missing and the override that accepts the slow path.
    """
    features = installed.detect() if features is None else features
    missing = missing_fast_path(cfg, features)
    if cfg.cluster.require_fast_path and missing:
        raise ConfigError(f"cluster={cfg.cluster.name} needs the fast path, but {', '.join(missing)} "
                          f"{'does' if len(missing) == 1 else 'do'} not import here (a 1.5x-10x slower run); use the "
                          "container of slurm/container, or accept the slow path with cluster.require_fast_path=false")


def lr_decay_iters(cfg: Config) -> Optional[int]:
    """The LR decay length (``optim.lr_decay_iters``, else the run length); None if unknowable."""
    t = cfg.train
    if (t.train_iters is None) == (t.train_samples is None) or t.global_batch_size <= 0:
        return None
    iters = t.train_iters if t.train_iters is not None else math.ceil(t.train_samples / t.global_batch_size)
    return cfg.optim.lr_decay_iters or iters


def default_warmup_iters(decay_iters: int) -> int:
    """Warmup when ``optim.warmup_iters`` is unset: a quarter of the decay length, at most
    ``WARMUP_CAP`` iterations, so that any run length works without a second override
    (megatron requires warmup < decay)."""
    return min(WARMUP_CAP, decay_iters // 4)


def validate(cfg: Config, world_size: int, features: Optional[Features] = None) -> Config:
    """Checks every cross-field rule and returns the config with the derived values filled in
    (``parallel.dp``; ``optim.warmup_iters`` when unset).

    ``features`` (default: what imports in this process) decides what needs Transformer Engine.

    Raises:
        ConfigError: listing every violated rule, one per line.
    """
    features = installed.detect() if features is None else features
    errors: List[str] = []
    check(errors, world_size >= 1, f"world size {world_size} must be >= 1")
    errors += model_problems(cfg.model)
    dp = _check_layout(cfg, world_size, errors)
    if not errors:
        _check_batch(cfg, dp, errors)
    _check_run(cfg, errors)
    _check_precision_and_optim(cfg, features, errors)
    _check_cluster(cfg, world_size, errors)
    check_long_context(cfg, features, errors)
    _check_stage(cfg, errors)
    _check_domains(cfg, errors)
    _check_eval_tasks(cfg, errors)
    _check_failure_handling(cfg, errors)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
    optim = cfg.optim
    if optim.warmup_iters is None:
        optim = dataclasses.replace(optim, warmup_iters=default_warmup_iters(lr_decay_iters(cfg)))
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp), optim=optim)
