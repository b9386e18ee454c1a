"""Rules of long-context training: context parallelism, packed padding under CP, YaRN.

Part of :func:`megatron_qwen.config.validate.validate` (same one early pass, same message
style: the numbers and the override that fixes them). Nothing here imports torch.
"""

from __future__ import annotations

from typing import List

from megatron_qwen.config.features import Features
from megatron_qwen.config.schema import Config, ModelConfig

CP_COMM_TYPES = ("p2p", "all_gather", "a2a")  # Transformer Engine's (a2a+p2p needs hierarchical groups)
ROPE_SCALING_TYPES = ("yarn",)
YARN_EXAMPLE = ("model.rope_scaling.type=yarn model.rope_scaling.factor=4.0 "
                "model.rope_scaling.original_max_position_embeddings=32768")


def packed_pad_multiple(cfg: Config) -> int:
    """What every packed SFT sub-sequence is padded to a multiple of: ``data.extra.pad_to_multiple_of``,
    else ``2*cp`` (the context-parallel split cuts each sub-sequence into 2*cp chunks)."""
    explicit = (cfg.data.extra or {}).get("pad_to_multiple_of")
    if explicit is not None:
        return int(explicit)
    return 2 * cfg.parallel.cp if cfg.parallel.cp > 1 else 1


def _is_packed_sft(cfg: Config) -> bool:
    return cfg.data.type == "sft" and bool((cfg.data.extra or {}).get("pack", True))


def _check_split(cfg: Config, errors: List[str]) -> None:
    p, seq = cfg.parallel, cfg.train.seq_length
    if seq % (2 * p.cp):
        errors.append(f"train.seq_length={seq} is not divisible by 2*parallel.cp = {2 * p.cp} (context parallelism "
                      f"splits each sequence into 2*cp chunks); use a multiple of {2 * p.cp}")
    elif p.sp and (seq // p.cp) % p.tp:
        errors.append(f"train.seq_length={seq} / parallel.cp={p.cp} = {seq // p.cp} tokens per CP rank is not "
                      f"divisible by parallel.tp={p.tp} (sequence parallel); use a multiple of {2 * p.cp * p.tp}")


def _check_packed_padding(cfg: Config, errors: List[str]) -> None:
    if not _is_packed_sft(cfg):
        return
    pad, cp, seq = packed_pad_multiple(cfg), cfg.parallel.cp, cfg.train.seq_length
    if pad < 1:
        errors.append(f"data.extra.pad_to_multiple_of={pad} must be >= 1")
    elif cp > 1 and pad % (2 * cp):
        errors.append(f"data.extra.pad_to_multiple_of={pad} is not a multiple of 2*parallel.cp = {2 * cp} "
                      "(each packed sub-sequence is split into 2*cp chunks); unset it to pad to 2*cp")
    elif seq % pad:
        errors.append(f"train.seq_length={seq} is not divisible by data.extra.pad_to_multiple_of={pad} "
                      "(packed conversations are padded to it); change one of them")


def _check_comm_type(cfg: Config, features: Features, errors: List[str]) -> None:
    p, m = cfg.parallel, cfg.model
    kind = p.cp_comm_type
    if kind is None:
        return
    if kind not in CP_COMM_TYPES:
        errors.append(f"parallel.cp_comm_type={kind!r} must be one of {CP_COMM_TYPES} (or unset)")
    elif not features.te and kind != "all_gather":
        errors.append(f"parallel.cp_comm_type={kind} needs Transformer Engine, which is not installed (the local "
                      "attention all-gathers K/V); unset it or use all_gather")
    elif kind == "a2a" and (m.num_query_groups // p.tp) % p.cp:
        errors.append(f"parallel.cp_comm_type=a2a scatters heads over CP ranks: model.num_query_groups="
                      f"{m.num_query_groups} / tp={p.tp} KV heads per TP rank are not divisible by parallel.cp="
                      f"{p.cp}; use p2p or all_gather")


def check_rope_scaling(m: ModelConfig, errors: List[str]) -> None:
    """YaRN needs its type, factor and original context length."""
    r = m.rope_scaling
    if r.type is None:
        if r.factor is not None or r.original_max_position_embeddings is not None:
            errors.append(f"model.rope_scaling.type is missing (factor={r.factor}, original_max_position_embeddings="
                          f"{r.original_max_position_embeddings}); set all three fields, e.g. {YARN_EXAMPLE}")
        return
    if r.type not in ROPE_SCALING_TYPES:
        errors.append(f"model.rope_scaling.type={r.type!r} must be one of {ROPE_SCALING_TYPES}")
    for name in ("factor", "original_max_position_embeddings"):
        if getattr(r, name) is None:
            errors.append(f"model.rope_scaling.{name} is missing; set all three fields, e.g. {YARN_EXAMPLE}")
    if r.factor is not None and r.factor < 1:
        errors.append(f"model.rope_scaling.factor={r.factor} must be >= 1 (it stretches the context)")
    if r.original_max_position_embeddings is not None and r.original_max_position_embeddings < 1:
        errors.append(f"model.rope_scaling.original_max_position_embeddings={r.original_max_position_embeddings} "
                      "must be >= 1")


def check_long_context(cfg: Config, features: Features, errors: List[str]) -> None:
    """Appends every violated CP / packed-padding / rope-scaling rule to ``errors``."""
    if cfg.parallel.cp > 1 and cfg.parallel.tp >= 1:  # (sizes below 1 are reported by the layout check)
        _check_split(cfg, errors)
        _check_comm_type(cfg, features, errors)
    elif cfg.parallel.cp_comm_type is not None:
        errors.append(f"parallel.cp_comm_type={cfg.parallel.cp_comm_type} needs parallel.cp > 1; unset it")
    if cfg.parallel.cp >= 1:
        _check_packed_padding(cfg, errors)
    check_rope_scaling(cfg.model, errors)


def rope_kind(m: ModelConfig) -> str:
    """megatron's ``position_embedding_type`` for the model: ``yarn`` with rope scaling, else ``rope``."""
    return "rope" if m.rope_scaling.type is None else "yarn"


def long_context_kwargs(cfg: Config, features: Features) -> dict:
    """The context-parallel and YaRN arguments of megatron's ``TransformerConfig``.

    YaRN: TE's fused RoPE would drop YaRN's attention factor (megatron warns and falls back
    only for unpacked rows), so YaRN always takes the unfused path.
    """
    kwargs = {}
    if cfg.parallel.cp > 1:
        # The local attention always all-gathers; TE's default is the ring (p2p).
        kwargs["cp_comm_type"] = cfg.parallel.cp_comm_type or ("p2p" if features.te else "all_gather")
    if cfg.model.rope_scaling.type is not None:
        kwargs["apply_rope_fusion"] = False
    return kwargs


def apply_yarn(config, cfg: Config) -> None:
    """Sets YaRN's settings on a megatron ``TransformerConfig`` (no-op without rope scaling).

    They are not ``TransformerConfig`` fields in megatron-core 0.16.1 (GPTModel and the
    attention read them with ``getattr``), so they are attributes; the values reproduce
    transformers' YaRN (beta_fast 32, beta_slow 1, truncated correction range, attention
    factor 0.1*ln(factor)+1).
    """
    r = cfg.model.rope_scaling
    if r.type is None:
        return
    config.yarn_rotary_scaling_factor = float(r.factor)
    config.yarn_original_max_position_embeddings = int(r.original_max_position_embeddings)
    config.yarn_beta_fast, config.yarn_beta_slow = 32.0, 1.0
    config.yarn_mscale = config.yarn_mscale_all_dim = None  # attention factor from the factor alone
    config.yarn_correction_range_round_to_int = True
