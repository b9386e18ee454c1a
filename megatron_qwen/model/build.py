"""Build Qwen2.5 as one megatron-core ``GPTModel`` per pipeline (virtual) stage."""

from __future__ import annotations

from typing import List

from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_qwen.config.long_context import rope_kind
from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.model.init import check_norm_weights, init_weights
from megatron_qwen.model.spec import build_block_spec


def build_model_chunk(model: ModelConfig, config: TransformerConfig, vp_stage=None) -> GPTModel:
    """One GPTModel holding the layers of this rank's stage ``vp_stage``."""
    pre = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    post = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    return GPTModel(
        config=config,
        transformer_layer_spec=build_block_spec(config, vp_stage=vp_stage),
        vocab_size=model.vocab_size,  # exactly the HF vocab: no extra padding
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre,
        post_process=post,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type=rope_kind(model),  # rope, or yarn with model.rope_scaling
        rotary_base=int(model.rope_theta),
        vp_stage=vp_stage,
    )


def build_model(model: ModelConfig, config: TransformerConfig, seed: int) -> List[GPTModel]:
    """All model chunks of this rank (one per virtual stage), initialized from ``seed``.

    Initialization is a function of (seed, global parameter name) only, so every
    TP/PP/VPP/DP layout starts from the same weights.
    """
    vpp = config.virtual_pipeline_model_parallel_size
    stages = [None] if vpp is None else list(range(vpp))
    chunks = [build_model_chunk(model, config, vp_stage=s) for s in stages]
    for chunk in chunks:
        init_weights(chunk, model, seed)
        check_norm_weights(chunk)
    return chunks
