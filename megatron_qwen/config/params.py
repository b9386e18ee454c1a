"""Parameter and FLOP counts computed from the config alone (no model is built)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List, Optional

from megatron_qwen.config.schema import ModelConfig


@dataclass(frozen=True)
class ParamCounts:
    total: int
    embedding: int  # input embedding plus an untied output layer
    active: int  # parameters used per token (MoE: top-k routed plus shared experts)

    @property
    def non_embedding(self) -> int:
        return self.total - self.embedding


def _attention_params(m: ModelConfig) -> int:
    q, g = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    # Q/K/V weights with bias (Qwen's only bias), output projection without.
    return m.hidden_size * (q + 2 * g) + (q + 2 * g) + q * m.hidden_size


def _mlp_params(hidden: int, ffn: int) -> int:
    return 3 * hidden * ffn  # SwiGLU: gate, up, down


def moe_layer_pattern(m: ModelConfig) -> List[int]:
    """1 for each MoE layer, 0 for each dense layer, in layer order.

    Layer i (0-based) is MoE when ``(i + 1) % moe_layer_freq == 0``, which is Hugging
    Face's ``decoder_sparse_step`` rule; megatron's integer ``moe_layer_freq`` counts from
    layer 0 instead, so the translation hands megatron this explicit list.
    """
    if m.num_experts is None:
        return [0] * m.num_layers
    return [int((i + 1) % m.moe_layer_freq == 0) for i in range(m.num_layers)]


def is_moe_layer(m: ModelConfig, layer: int) -> bool:
    """Whether 0-based ``layer`` has routed experts (see :func:`moe_layer_pattern`)."""
    return bool(moe_layer_pattern(m)[layer])


def layer_params(m: ModelConfig, layer: int) -> tuple[int, int]:
    """(total, active) parameters of one transformer layer."""
    base = _attention_params(m) + 2 * m.hidden_size  # + two RMSNorm weights
    if not is_moe_layer(m, layer):
        mlp = _mlp_params(m.hidden_size, m.ffn_hidden_size)
        return base + mlp, base + mlp
    expert = _mlp_params(m.hidden_size, m.moe_ffn_hidden_size)
    shared = 0
    if m.moe_shared_expert_ffn_hidden_size:
        shared = _mlp_params(m.hidden_size, m.moe_shared_expert_ffn_hidden_size)
        shared += m.hidden_size if m.moe_shared_expert_gate else 0
    router = m.hidden_size * m.num_experts
    total = base + router + shared + m.num_experts * expert
    return total, base + router + shared + m.moe_router_topk * expert


def count_parameters(m: ModelConfig) -> ParamCounts:
    """Exact parameter count of the megatron (and HF) model for this config."""
    embedding = m.vocab_size * m.hidden_size * (1 if m.tie_word_embeddings else 2)
    layers = [layer_params(m, i) for i in range(m.num_layers)]
    total = embedding + sum(t for t, _ in layers) + m.hidden_size  # + final norm
    active = embedding + sum(a for _, a in layers) + m.hidden_size
    return ParamCounts(total=total, embedding=embedding, active=active)


def flops_per_token(m: ModelConfig, seq_length: int) -> float:
    """Model FLOPs per trained token (forward + backward), Megatron's formula.

    6 * (matmul parameters touched per token) + causal attention 6 * q * L * s, with GQA
    and SwiGLU; MoE counts only the routed top-k and shared experts.
    """
    q = m.num_attention_heads * m.head_dim
    g = m.num_query_groups * m.head_dim
    h = m.hidden_size
    per_layer = 0
    for layer in range(m.num_layers):
        per_layer += h * (q + 2 * g) + q * h
        if is_moe_layer(m, layer):
            ffn = m.moe_router_topk * m.moe_ffn_hidden_size + (m.moe_shared_expert_ffn_hidden_size or 0)
            per_layer += 3 * h * ffn + h * m.num_experts
        else:
            per_layer += 3 * h * m.ffn_hidden_size
    return 6.0 * (per_layer + h * m.vocab_size) + 6.0 * q * m.num_layers * seq_length


def pipeline_stage_sizes(num_layers: int, pp: int, first: Optional[int] = None,
                         last: Optional[int] = None) -> List[int]:
    """Layers on each pipeline rank (without VPP): ``first``/``last`` where given, the
    remaining layers split evenly over the other ranks (floor; validation checks it divides)."""
    fixed = {0: first, pp - 1: last} if pp > 1 else {}
    fixed = {rank: n for rank, n in fixed.items() if n is not None}
    free = [rank for rank in range(pp) if rank not in fixed]
    each = (num_layers - sum(fixed.values())) // len(free) if free else 0
    return [fixed.get(rank, each) for rank in range(pp)]


def layout_stages(layout: str) -> List[str]:
    """megatron's ``pipeline_model_parallel_layout`` string unrolled into one entry per virtual
    stage (ordered chunk by chunk: entry c * pp + rank is chunk c of pipeline rank ``rank``), each
    a string of E (embedding), t (decoder layer) and L (output layer and loss); the same grammar
    as megatron's ``PipelineParallelLayerLayout.parse_str_to_list``, without importing torch."""
    text = layout.replace(",", "")  # commas are cosmetic
    text = re.sub(r"\(([^)]+)\)\*(\d+)", lambda x: x.group(1) * int(x.group(2)), text)
    text = re.sub(r"(.)\*(\d+)", lambda x: x.group(1) * int(x.group(2)), text)
    return text.split("|")
