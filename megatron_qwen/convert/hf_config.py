"""Hugging Face ``config.json`` (Qwen2.5 and Qwen2-MoE) <-> our :class:`ModelConfig`.

Reading goes through transformers' own config class, so legacy fields (``rope_theta``,
``rope_scaling``, ``torch_dtype``) and transformers-5 fields (``rope_parameters``, ``dtype``)
mean exactly what transformers makes of them. Writing produces the field set of the published
Qwen2.5 ``config.json`` files (top-level ``rope_theta`` and ``torch_dtype``), which
transformers, vLLM and llama.cpp all read, plus YaRN's ``rope_scaling`` block in the form
Qwen documents for serving beyond 32K tokens.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Dict, Optional

import torch
import transformers

from megatron_qwen.config.schema import ModelConfig, RopeScalingConfig
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.data.tokenizer import EOD_TOKEN_ID, STOP_TOKEN_IDS

ARCHITECTURES = {"Qwen2ForCausalLM": transformers.Qwen2Config, "Qwen2MoeForCausalLM": transformers.Qwen2MoeConfig}
DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
CLI_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def read_config_json(hf_dir: Path) -> Dict:
    """The parsed ``config.json`` of an HF model directory."""
    path = Path(hf_dir) / "config.json"
    if not Path(hf_dir).is_dir():
        raise ConvertError(f"{hf_dir} is not a directory")
    if not path.is_file():
        raise ConvertError(f"{hf_dir} has no config.json; point --hf at a Hugging Face model directory")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConvertError(f"{path} is not valid JSON: {err}") from err
    except RecursionError as err:
        raise ConvertError(f"{path} is nested too deeply to be a config.json") from err
    if not isinstance(raw, dict):
        raise ConvertError(f"{path} holds a JSON {type(raw).__name__}, not an object of config fields")
    return raw


def _parse(raw: Dict, source: str) -> transformers.PretrainedConfig:
    archs = raw.get("architectures") or []
    if not isinstance(archs, list) or len(archs) != 1 or archs[0] not in ARCHITECTURES:
        raise ConvertError(f"{source}: architecture {archs or 'missing'} is not supported; "
                           f"expected one of {sorted(ARCHITECTURES)}")
    try:
        config = ARCHITECTURES[archs[0]].from_dict(raw)
    except Exception as err:  # noqa: BLE001  transformers validates field types and values its own way
        raise ConvertError(f"{source}: transformers refuses it: {' '.join(str(err).split())}") from err
    _check_sizes(config, source)
    rope = config.rope_parameters or {}
    unsupported = {
        "hidden_act": (config.hidden_act, "silu"),
        "use_sliding_window": (config.use_sliding_window, False),
        "rope_type": (rope.get("rope_type", "default"), ("default", "yarn")),
    }
    if rope.get("rope_type") == "yarn":  # our YaRN has transformers' defaults for these
        unsupported.update({f"rope_scaling.{k}": (rope.get(k), v) for k, v in _YARN_DEFAULTS.items()})
    if archs[0] == "Qwen2MoeForCausalLM":
        # Our MoE layers follow decoder_sparse_step; a list of dense layers has no equivalent.
        unsupported.update(qkv_bias=(config.qkv_bias, True), mlp_only_layers=(list(config.mlp_only_layers), []))
    for field, (value, wanted) in unsupported.items():
        options = wanted if isinstance(wanted, tuple) else (wanted,)
        if value not in options:
            raise ConvertError(f"{source}: {field}={value!r} is not supported (supported: "
                               f"{' or '.join(map(repr, options))})")
    return config


# YaRN parameters beyond type, factor and original length: absent (None) or transformers' defaults.
_YARN_DEFAULTS = {"attention_factor": (None,), "beta_fast": (None, 32, 32.0), "beta_slow": (None, 1, 1.0),
                  "mscale": (None,), "mscale_all_dim": (None,), "truncate": (None, True)}


def _rope_scaling(c: transformers.PretrainedConfig) -> RopeScalingConfig:
    rope = c.rope_parameters or {}
    if rope.get("rope_type") != "yarn":
        return RopeScalingConfig()
    original = int(rope["original_max_position_embeddings"])
    factor = rope.get("factor") or c.max_position_embeddings / original  # transformers' fallback
    return RopeScalingConfig(type="yarn", factor=float(factor), original_max_position_embeddings=original)


def hf_rope_scaling(model: ModelConfig) -> Optional[Dict]:
    """The ``rope_scaling`` block of ``config.json`` (None without rope scaling)."""
    r = model.rope_scaling
    if r.type is None:
        return None
    return {"type": r.type, "factor": r.factor, "original_max_position_embeddings": r.original_max_position_embeddings}


_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
          "vocab_size", "max_position_embeddings")
_MOE_SIZES = ("num_experts", "moe_intermediate_size", "num_experts_per_tok", "decoder_sparse_step")
_MAX_SIZE = 2**31 - 1  # keeps every weight's element count within int64


def _is_size(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 1 <= value <= _MAX_SIZE


def _is_positive(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < math.inf


def _check_sizes(c: transformers.PretrainedConfig, source: str) -> None:
    """Raises unless the sizes are positive whole numbers that fit together (transformers checks types only)."""
    names = _SIZES + (_MOE_SIZES if isinstance(c, transformers.Qwen2MoeConfig) else ())
    names += ("head_dim",) if getattr(c, "head_dim", None) is not None else ()
    problems = [f"{n}={getattr(c, n, None)!r} must be a whole number in [1, {_MAX_SIZE}]"
                for n in names if not _is_size(getattr(c, n, None))]
    theta = (c.rope_parameters or {}).get("rope_theta")
    problems += [f"{n}={v!r} must be a positive number" for n, v in (("rms_norm_eps", c.rms_norm_eps),
                 ("rope_theta", theta), ("initializer_range", c.initializer_range)) if not _is_positive(v)]
    if problems:
        raise ConvertError(f"{source}: " + "; ".join(problems))
    if c.num_attention_heads % c.num_key_value_heads:
        problems.append(f"num_attention_heads={c.num_attention_heads} is not divisible by "
                        f"num_key_value_heads={c.num_key_value_heads}")
    if isinstance(c, transformers.Qwen2MoeConfig):
        shared = c.shared_expert_intermediate_size
        if not (shared in (0, None) or _is_size(shared)):
            problems.append(f"shared_expert_intermediate_size={shared!r} must be 0 (none) or a whole number >= 1")
        if c.num_experts_per_tok > c.num_experts:
            problems.append(f"num_experts_per_tok={c.num_experts_per_tok} exceeds num_experts={c.num_experts}")
    if problems:
        raise ConvertError(f"{source}: " + "; ".join(problems))


def _moe_fields(c: transformers.PretrainedConfig) -> Dict:
    if not isinstance(c, transformers.Qwen2MoeConfig):
        return {}
    return dict(num_experts=c.num_experts, moe_ffn_hidden_size=c.moe_intermediate_size,
                moe_router_topk=c.num_experts_per_tok,
                moe_shared_expert_ffn_hidden_size=c.shared_expert_intermediate_size or None,
                moe_shared_expert_gate=bool(c.shared_expert_intermediate_size),  # HF gates every shared expert
                moe_layer_freq=c.decoder_sparse_step, moe_aux_loss_coeff=float(c.router_aux_loss_coef),
                moe_norm_topk_prob=bool(c.norm_topk_prob))


def model_name(hf_dir: Path) -> str:
    """A config-group-safe model name from the HF directory name (``Qwen2.5-7B`` -> ``qwen2_5_7b``)."""
    return re.sub(r"[^a-z0-9]+", "_", Path(hf_dir).absolute().name.lower()).strip("_") or "converted"


def model_config_from_hf(raw: Dict, name: str, source: str = "config.json") -> ModelConfig:
    """Our model config for a Qwen2.5 or Qwen2-MoE ``config.json`` (already parsed)."""
    c = _parse(raw, source)
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return ModelConfig(
        name=name,
        num_layers=c.num_hidden_layers,
        hidden_size=c.hidden_size,
        ffn_hidden_size=c.intermediate_size,
        num_attention_heads=c.num_attention_heads,
        num_query_groups=c.num_key_value_heads,
        kv_channels=None if head_dim * c.num_attention_heads == c.hidden_size else head_dim,
        vocab_size=c.vocab_size,
        tie_word_embeddings=bool(c.tie_word_embeddings),
        rms_norm_eps=float(c.rms_norm_eps),
        max_position_embeddings=c.max_position_embeddings,
        rope_theta=float(c.rope_parameters["rope_theta"]),
        rope_scaling=_rope_scaling(c),
        init_method_std=float(c.initializer_range),
        **_moe_fields(c),
    )


def config_dtype(raw: Dict) -> Optional[torch.dtype]:
    """The dtype a ``config.json`` declares (``torch_dtype`` or transformers-5 ``dtype``)."""
    name = raw.get("torch_dtype") or raw.get("dtype")
    return next((d for d, n in DTYPE_NAMES.items() if n == name), None)


def _special_id(model: ModelConfig) -> Optional[int]:
    # Tiny test vocabularies do not contain Qwen's special tokens.
    return EOD_TOKEN_ID if model.vocab_size > EOD_TOKEN_ID else None


def hf_config_from_model(model: ModelConfig, dtype: torch.dtype) -> Dict:
    """A ``config.json`` in the field set of the published Qwen2.5 (or Qwen2-MoE) releases."""
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "attention_dropout": 0.0,
        "bos_token_id": _special_id(model),
        "eos_token_id": _special_id(model),
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "initializer_range": model.init_method_std,
        "intermediate_size": model.ffn_hidden_size,
        "max_position_embeddings": model.max_position_embeddings,
        "max_window_layers": model.num_layers,
        "model_type": "qwen2",
        "num_attention_heads": model.num_attention_heads,
        "num_hidden_layers": model.num_layers,
        "num_key_value_heads": model.num_query_groups,
        "rms_norm_eps": model.rms_norm_eps,
        "rope_theta": model.rope_theta,
        "sliding_window": model.max_position_embeddings,
        "tie_word_embeddings": model.tie_word_embeddings,
        "torch_dtype": DTYPE_NAMES[dtype],
        "transformers_version": transformers.__version__,
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": model.vocab_size,
    }
    if model.kv_channels is not None:
        config["head_dim"] = model.kv_channels
    if hf_rope_scaling(model) is not None:
        config["rope_scaling"] = hf_rope_scaling(model)
    if model.num_experts is not None:
        config.update(_hf_moe_fields(model))
    return dict(sorted(config.items()))


def _hf_moe_fields(model: ModelConfig) -> Dict:
    """The Qwen2-MoE fields of the published Qwen1.5-MoE / Qwen2-57B-A14B ``config.json``."""
    return {
        "architectures": ["Qwen2MoeForCausalLM"],
        "model_type": "qwen2_moe",
        "decoder_sparse_step": model.moe_layer_freq,
        "mlp_only_layers": [],
        "moe_intermediate_size": model.moe_ffn_hidden_size,
        "norm_topk_prob": model.moe_norm_topk_prob,
        "num_experts": model.num_experts,
        "num_experts_per_tok": model.moe_router_topk,
        "output_router_logits": False,
        "qkv_bias": True,
        "router_aux_loss_coef": model.moe_aux_loss_coeff,
        "shared_expert_intermediate_size": model.moe_shared_expert_ffn_hidden_size or 0,
    }


def generation_config(model: ModelConfig) -> Dict:
    """``generation_config.json``: greedy, 2048 new tokens (as the Qwen2.5 base releases), stopping at
    ``<|im_end|>`` or ``<|endoftext|>`` as the Instruct releases and our sampler do (the chat template
    ends every turn with ``<|im_end|>``, plain text ends with ``<|endoftext|>``)."""
    config = {"do_sample": False, "max_new_tokens": 2048, "transformers_version": transformers.__version__}
    if _special_id(model) is not None:
        config.update(bos_token_id=EOD_TOKEN_ID, eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=EOD_TOKEN_ID)
    return config


def check_same_model(hf: ModelConfig, ckpt: ModelConfig, source: str) -> None:
    """Raises unless an HF model and a checkpoint describe the same architecture and sizes."""
    fields = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
              "head_dim", "vocab_size", "tie_word_embeddings", "rms_norm_eps", "rope_theta", "num_experts",
              "moe_ffn_hidden_size", "moe_router_topk", "moe_shared_expert_ffn_hidden_size", "moe_layer_freq",
              "moe_norm_topk_prob")
    diffs = [f"{f}: HF {getattr(hf, f)} vs checkpoint {getattr(ckpt, f)}" for f in fields
             if getattr(hf, f) != getattr(ckpt, f)]
    if diffs:
        raise ConvertError(f"{source} is a checkpoint of a different model: " + "; ".join(diffs))
