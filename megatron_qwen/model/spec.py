"""Layer specs for Qwen2.5 / Qwen2-MoE: Transformer Engine when it imports, local otherwise.

Parallelism and kernel choice enter only here, through megatron-core ``ModuleSpec``s:
model code never branches on TP/SP. Both specs produce the same parameter names and
the same ``dist_checkpointing`` keys (the local spec maps its norms onto TE's fused
layernorm-linear keys), so checkpoints move freely between a CPU box and an H100 node.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Optional

from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.config import features as installed
from megatron_qwen.model.layers import RMSNorm, SDPAttention


def _localize_layer(spec: ModuleSpec) -> ModuleSpec:
    """Swaps the local spec's torch norm and CUDA-only attention for our layers."""
    spec = copy.deepcopy(spec)
    sub = spec.submodules
    attention = sub.self_attention
    attention.submodules = dataclasses.replace(attention.submodules, core_attention=SDPAttention)
    spec.submodules = dataclasses.replace(sub, input_layernorm=RMSNorm, pre_mlp_layernorm=RMSNorm)
    return spec


def build_block_spec(
    config: TransformerConfig, vp_stage: Optional[int] = None, te: Optional[bool] = None
) -> TransformerBlockSubmodules:
    """Block spec for the layers of one pipeline (virtual) stage, final norm included.

    ``te`` defaults to whether Transformer Engine imports (:func:`megatron_qwen.config.features.detect`, the same
    answer ``validate()`` and the config translation use).
    """
    te = installed.detect().te if te is None else te
    block = get_gpt_decoder_block_spec(
        config, use_transformer_engine=te, normalization="RMSNorm", vp_stage=vp_stage
    )
    if te:
        return block
    return TransformerBlockSubmodules(
        layer_specs=[_localize_layer(s) for s in block.layer_specs], layer_norm=RMSNorm
    )
