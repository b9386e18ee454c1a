"""One early validation pass over the composed config.

Runs before any process group exists (it only needs the world size), so a bad layout
fails in seconds on a login node instead of minutes into a SLURM job. Every message
names the numbers involved and the override that fixes it.
"""

from __future__ import annotations

import dataclasses
import math
import signal
from typing import List, Optional

from megatron_qwen.config import features as installed
from megatron_qwen.config.features import Features
from megatron_qwen.config.params import pipeline_stage_sizes
from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.errors import UserError

RECOMPUTE_MODES = ("none", "selective", "full")
DTYPES = ("fp32", "bf16", "fp16")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise")
DECAY_STYLES = ("cosine", "wsd", "linear", "constant")
MOE_DROP_POLICIES = ("probs", "position")
SPIKE_ACTIONS = ("none", "warn", "rollback")
WARMUP_CAP = 2000  # iterations; the default warmup of long runs (Qwen/Llama recipes use ~2000)


class ConfigError(UserError, ValueError):
    """A configuration that cannot run; the message says why and how to fix it."""


def _check(errors: List[str], ok: bool, message: str) -> None:
    if not ok:
        errors.append(message)


def _check_layout(cfg: Config, world_size: int, errors: List[str]) -> int:
    """Checks world-size arithmetic and returns the data-parallel size."""
    p, m = cfg.parallel, cfg.model
    for name in ("tp", "pp", "cp", "ep"):
        _check(errors, getattr(p, name) >= 1, f"parallel.{name}={getattr(p, name)} must be >= 1")
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
    _check(errors, p.dp in (None, dp),
           f"parallel.dp={p.dp} but world size {world_size} / (tp*pp*cp={model_parallel}) = {dp}; "
           "leave parallel.dp unset to derive it")
    _check(errors, m.num_attention_heads % p.tp == 0,
           f"model.num_attention_heads={m.num_attention_heads} is not divisible by parallel.tp={p.tp}")
    _check(errors, m.num_query_groups % p.tp == 0,
           f"model.num_query_groups={m.num_query_groups} (KV heads) is not divisible by "
           f"parallel.tp={p.tp}; use a tp that divides {m.num_query_groups}")
    _check(errors, m.vocab_size % p.tp == 0,
           f"model.vocab_size={m.vocab_size} is not divisible by parallel.tp={p.tp}")
    _check_pipeline_split(cfg, errors)
    if p.vpp is not None:
        _check(errors, p.vpp >= 2 and p.pp >= 2,
               f"parallel.vpp={p.vpp} needs vpp >= 2 and parallel.pp >= 2 (got pp={p.pp}); unset vpp")
    _check(errors, not p.sp or p.tp > 1,
           "parallel.sp=true needs parallel.tp > 1 (sequence parallel splits along TP)")
    if p.sp:
        _check(errors, cfg.train.seq_length % p.tp == 0,
               f"train.seq_length={cfg.train.seq_length} is not divisible by parallel.tp={p.tp} (sequence parallel)")
    # NOTE: refused on every path, TE included: no code splits the batch per CP rank yet, so
    # each rank would train on the whole sequence with shifted RoPE positions.
    _check(errors, p.cp == 1,
           f"parallel.cp={p.cp}: context parallelism is not implemented yet; set parallel.cp=1")
    _check_experts(cfg, world_size, errors)
    return dp


def _check_pipeline_split(cfg: Config, errors: List[str]) -> None:
    """Layers must split evenly over pp*vpp stages, or as first/last + even rest."""
    p, m = cfg.parallel, cfg.model
    if p.pp_first_stage_layers is None and p.pp_last_stage_layers is None:
        stages = p.pp * (p.vpp or 1)
        _check(errors, m.num_layers % stages == 0,
               f"model.num_layers={m.num_layers} is not divisible by pp*vpp = {p.pp}*{p.vpp or 1} = {stages}; "
               "set parallel.pp_first_stage_layers / pp_last_stage_layers for an uneven split")
        return
    _check(errors, p.pp > 1 and p.vpp is None,
           f"parallel.pp_first_stage_layers / pp_last_stage_layers need pp > 1 and no vpp (got pp={p.pp}, "
           f"vpp={p.vpp})")
    if errors:
        return
    sizes = pipeline_stage_sizes(m.num_layers, p.pp, p.pp_first_stage_layers, p.pp_last_stage_layers)
    _check(errors, sum(sizes) == m.num_layers and min(sizes) >= 1,
           f"model.num_layers={m.num_layers} cannot be split over pp={p.pp} stages with "
           f"pp_first_stage_layers={p.pp_first_stage_layers}, pp_last_stage_layers={p.pp_last_stage_layers} "
           f"(the other stages would get {sizes[1:-1] or 'nothing'}): every stage needs >= 1 layer and the rest "
           "must divide evenly")


def _check_experts(cfg: Config, world_size: int, errors: List[str]) -> None:
    p, m = cfg.parallel, cfg.model
    if m.num_experts is None:
        _check(errors, p.ep == 1, f"parallel.ep={p.ep} needs an MoE model (model.num_experts is unset)")
        _check(errors, p.etp is None, f"parallel.etp={p.etp} needs an MoE model (model.num_experts is unset)")
        return
    _check(errors, m.num_experts % p.ep == 0,
           f"model.num_experts={m.num_experts} is not divisible by parallel.ep={p.ep}")
    etp = p.etp or p.tp
    expert_model_parallel = etp * p.ep * p.pp
    _check(errors, world_size % expert_model_parallel == 0,
           f"world size {world_size} is not divisible by etp*ep*pp = {etp}*{p.ep}*{p.pp} = {expert_model_parallel} "
           "(the expert data-parallel size is world / (etp*ep*pp))")
    _check(errors, m.moe_ffn_hidden_size is not None and m.moe_ffn_hidden_size % etp == 0,
           f"model.moe_ffn_hidden_size={m.moe_ffn_hidden_size} must be set and divisible by etp={etp}")
    # megatron's MoE layer refuses TP without sequence parallel during training.
    _check(errors, p.tp == 1 or p.sp,
           f"an MoE model at parallel.tp={p.tp} needs parallel.sp=true (sequence parallel)")
    _check_moe_routing(m, errors)


def _check_moe_routing(m: ModelConfig, errors: List[str]) -> None:
    _check(errors, 1 <= m.moe_router_topk <= m.num_experts,
           f"model.moe_router_topk={m.moe_router_topk} must be in [1, num_experts={m.num_experts}]")
    _check(errors, not (m.moe_router_topk == 1 and m.moe_norm_topk_prob),
           "model.moe_norm_topk_prob=true with moe_router_topk=1 gives every token probability 1 "
           "and a zero router gradient; set moe_norm_topk_prob=false")
    _check(errors, 1 <= m.moe_layer_freq <= m.num_layers,
           f"model.moe_layer_freq={m.moe_layer_freq} must be in [1, num_layers={m.num_layers}] "
           "(every moe_layer_freq-th layer is MoE)")
    _check(errors, not m.moe_shared_expert_gate or m.moe_shared_expert_ffn_hidden_size is not None,
           "model.moe_shared_expert_gate=true needs model.moe_shared_expert_ffn_hidden_size (the shared expert)")
    _check(errors, m.moe_aux_loss_coeff >= 0, f"model.moe_aux_loss_coeff={m.moe_aux_loss_coeff} must be >= 0")
    _check(errors, m.moe_z_loss_coeff is None or m.moe_z_loss_coeff >= 0,
           f"model.moe_z_loss_coeff={m.moe_z_loss_coeff} must be >= 0 (or null)")
    _check(errors, m.moe_capacity_factor is None or m.moe_capacity_factor > 0,
           f"model.moe_capacity_factor={m.moe_capacity_factor} must be > 0 (or null for no token dropping)")
    _check(errors, m.moe_token_drop_policy in MOE_DROP_POLICIES,
           f"model.moe_token_drop_policy={m.moe_token_drop_policy!r} must be one of {MOE_DROP_POLICIES}")
    _check(errors, not m.moe_pad_to_capacity or m.moe_capacity_factor is not None,
           "model.moe_pad_to_capacity=true needs model.moe_capacity_factor")


def _check_model(m: ModelConfig, errors: List[str]) -> None:
    for name in ("hidden_dropout", "attention_dropout"):
        value = getattr(m, name)
        _check(errors, 0.0 <= value < 1.0, f"model.{name}={value} must be in [0, 1)")


def _check_batch(cfg: Config, dp: int, errors: List[str]) -> None:
    t = cfg.train
    per_step = t.micro_batch_size * dp
    _check(errors, t.micro_batch_size >= 1, f"train.micro_batch_size={t.micro_batch_size} must be >= 1")
    _check(errors, t.stop_check_interval >= 1, f"train.stop_check_interval={t.stop_check_interval} must be >= 1")
    _check(errors, isinstance(getattr(signal, t.exit_signal, None), signal.Signals),
           f"train.exit_signal={t.exit_signal!r} is not a signal name (e.g. SIGUSR1, SIGUSR2, SIGINT)")
    _check(errors, per_step > 0 and t.global_batch_size % per_step == 0,
           f"train.global_batch_size={t.global_batch_size} is not divisible by micro_batch_size*dp = "
           f"{t.micro_batch_size}*{dp} = {per_step}")
    _check(errors, (t.train_iters is None) != (t.train_samples is None),
           "set exactly one of train.train_iters and train.train_samples "
           f"(got train_iters={t.train_iters}, train_samples={t.train_samples})")
    _check(errors, t.seq_length <= cfg.model.max_position_embeddings,
           f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings={cfg.model.max_position_embeddings}")
    p = cfg.parallel
    if p.vpp is not None and per_step > 0 and t.global_batch_size % per_step == 0:
        microbatches = t.global_batch_size // per_step
        _check(errors, microbatches % p.pp == 0,
               f"interleaved pipeline (vpp={p.vpp}) needs the number of micro-batches "
               f"{microbatches} (= global_batch_size / (micro_batch_size*dp)) divisible by pp={p.pp}")


def _check_precision_and_optim(cfg: Config, features: Features, errors: List[str]) -> None:
    pr, o, p = cfg.precision, cfg.optim, cfg.parallel
    _check(errors, pr.dtype in DTYPES, f"precision.dtype={pr.dtype!r} must be one of {DTYPES}")
    if pr.fp8 is not None:
        _check(errors, pr.fp8 in FP8_RECIPES, f"precision.fp8={pr.fp8!r} must be one of {FP8_RECIPES}")
        _check(errors, features.te,
               f"precision.fp8={pr.fp8} needs Transformer Engine, which is not installed; "
               "use precision=bf16 or install Transformer Engine (NGC PyTorch containers ship it)")
        _check(errors, pr.dtype == "bf16", f"precision.fp8 needs precision.dtype=bf16 (got {pr.dtype})")
    _check(errors, p.recompute in RECOMPUTE_MODES,
           f"parallel.recompute={p.recompute!r} must be one of {RECOMPUTE_MODES}")
    _check(errors, not p.overlap_param_gather or p.use_distributed_optimizer,
           "parallel.overlap_param_gather=true needs parallel.use_distributed_optimizer=true")
    _check(errors, o.decay_style in DECAY_STYLES, f"optim.decay_style={o.decay_style!r} must be one of {DECAY_STYLES}")
    _check(errors, 0.0 <= o.min_lr <= o.lr, f"optim.min_lr={o.min_lr} must be in [0, optim.lr={o.lr}]")
    if o.decay_style == "wsd":
        _check(errors, o.wsd_decay_iters is not None and o.wsd_decay_iters > 0,
               "optim.decay_style=wsd needs optim.wsd_decay_iters > 0 (length of the final decay)")
    decay = lr_decay_iters(cfg)
    if decay is not None and o.warmup_iters is not None:
        _check(errors, o.warmup_iters < decay,
               f"optim.warmup_iters={o.warmup_iters} must be below the LR decay length {decay} "
               "(optim.lr_decay_iters, else the number of iterations); lower optim.warmup_iters")


def _check_failure_handling(cfg: Config, errors: List[str]) -> None:
    t, s = cfg.train, cfg.train.loss_spike
    _check(errors, t.max_skipped_consecutive >= 1,
           f"train.max_skipped_consecutive={t.max_skipped_consecutive} must be >= 1")
    _check(errors, s.action in SPIKE_ACTIONS, f"train.loss_spike.action={s.action!r} must be one of {SPIKE_ACTIONS}")
    for name in ("nan_grad_at_steps", "spike_batch_at_steps"):
        steps = getattr(cfg.debug, name)
        _check(errors, all(step >= 1 for step in steps), f"debug.{name}={list(steps)}: steps count from 1")
    if s.action == "none":
        return
    _check(errors, s.factor is not None or s.zscore is not None,
           f"train.loss_spike.action={s.action} needs train.loss_spike.factor (e.g. 1.5) or .zscore (e.g. 6)")
    _check(errors, s.factor is None or s.factor > 1, f"train.loss_spike.factor={s.factor} must be > 1")
    _check(errors, s.zscore is None or s.zscore > 0, f"train.loss_spike.zscore={s.zscore} must be > 0")
    _check(errors, 2 <= s.min_history <= s.window,
           f"train.loss_spike.min_history={s.min_history} must be in [2, window={s.window}]")
    _check(errors, s.skip_batches >= 1 and s.max_rollbacks >= 1,
           f"train.loss_spike.skip_batches={s.skip_batches} and max_rollbacks={s.max_rollbacks} must be >= 1")
    _check(errors, s.action != "rollback" or bool(cfg.checkpoint.save_interval),
           "train.loss_spike.action=rollback needs checkpoints to roll back to: set checkpoint.save_interval")


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
    _check(errors, world_size >= 1, f"world size {world_size} must be >= 1")
    dp = _check_layout(cfg, world_size, errors)
    if not errors:
        _check_batch(cfg, dp, errors)
    _check_model(cfg.model, errors)
    _check_precision_and_optim(cfg, features, errors)
    _check_failure_handling(cfg, errors)
    if errors:
        raise ConfigError("invalid config: " + "; ".join(errors))
    optim = cfg.optim
    if optim.warmup_iters is None:
        optim = dataclasses.replace(optim, warmup_iters=default_warmup_iters(lr_decay_iters(cfg)))
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, dp=dp), optim=optim)
