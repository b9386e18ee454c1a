"""The one Hugging Face <-> Megatron weight table for Qwen2.5 and Qwen2-MoE.

Each :class:`Rule` pairs one megatron-core parameter, named as in a TP1/PP1 GPTModel of
our spec, with the Hugging Face tensors it is made of and a layout that says how:

- ``copy``: same tensor under another name;
- ``qkv``: Megatron fuses Q, K and V per GQA group: for each of the ``g`` KV heads, its
  ``heads/g`` query heads, then its key head, then its value head (rows of ``head_dim``);
- ``glu``: SwiGLU's fc1 is ``[gate; up]`` stacked along the output dimension.

Qwen2-MoE layers swap the dense MLP for router, routed experts, shared expert and its
gate; attention and norms are the same rules.

HF -> Megatron fuses with :func:`to_mcore`, Megatron -> HF splits with :func:`to_hf`; both
walk the same :func:`build_rules` list, in the same order, so they cannot disagree.
Fusing and splitting are pure reshapes and concatenations: a round trip is bit-exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from megatron_qwen.config.params import moe_layer_pattern
from megatron_qwen.config.schema import ModelConfig


@dataclass(frozen=True)
class Rule:
    """One megatron parameter and the HF tensors it is fused from."""

    mcore: str  # e.g. "decoder.layers.3.mlp.linear_fc1.weight"
    hf: Tuple[str, ...]  # e.g. ("model.layers.3.mlp.gate_proj.weight", "model.layers.3.mlp.up_proj.weight")
    layout: str  # copy | qkv | glu
    layer: Optional[int] = None  # transformer layer; None for embedding, final norm, output layer


# (megatron suffix, HF suffixes, layout) of every dense decoder layer.
_ATTENTION = (
    ("self_attention.linear_qkv.weight",
     ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"), "qkv"),
    ("self_attention.linear_qkv.bias",
     ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias"), "qkv"),
    ("self_attention.linear_proj.weight", ("self_attn.o_proj.weight",), "copy"),
    ("input_layernorm.weight", ("input_layernorm.weight",), "copy"),
    ("pre_mlp_layernorm.weight", ("post_attention_layernorm.weight",), "copy"),
)
_DENSE_MLP = (
    ("mlp.linear_fc1.weight", ("mlp.gate_proj.weight", "mlp.up_proj.weight"), "glu"),
    ("mlp.linear_fc2.weight", ("mlp.down_proj.weight",), "copy"),
)


_ROUTER = ("mlp.router.weight", ("mlp.gate.weight",), "copy")
_EXPERT = (  # routed expert {e}
    ("mlp.experts.local_experts.{e}.linear_fc1.weight",
     ("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight"), "glu"),
    ("mlp.experts.local_experts.{e}.linear_fc2.weight", ("mlp.experts.{e}.down_proj.weight",), "copy"),
)
_SHARED_EXPERT = (
    ("mlp.shared_experts.linear_fc1.weight",
     ("mlp.shared_expert.gate_proj.weight", "mlp.shared_expert.up_proj.weight"), "glu"),
    ("mlp.shared_experts.linear_fc2.weight", ("mlp.shared_expert.down_proj.weight",), "copy"),
)
_SHARED_EXPERT_GATE = ("mlp.shared_experts.gate_weight", ("mlp.shared_expert_gate.weight",), "copy")  # [1, h]


def _moe_mlp(model: ModelConfig) -> Tuple:
    """Qwen2-MoE's sparse block: router, routed experts (as stored on disk, one per index),
    shared expert and its sigmoid gate."""
    experts = tuple((m.format(e=e), tuple(h.format(e=e) for h in hs), layout)
                    for e in range(model.num_experts) for m, hs, layout in _EXPERT)
    shared = _SHARED_EXPERT if model.moe_shared_expert_ffn_hidden_size else ()
    gate = (_SHARED_EXPERT_GATE,) if shared and model.moe_shared_expert_gate else ()
    return (_ROUTER,) + experts + shared + gate


def _layer_rules(model: ModelConfig, layer: int) -> List[Rule]:
    mlp = _moe_mlp(model) if moe_layer_pattern(model)[layer] else _DENSE_MLP
    mc, hf = f"decoder.layers.{layer}.", f"model.layers.{layer}."
    return [Rule(mc + m, tuple(hf + h for h in hs), layout, layer) for m, hs, layout in _ATTENTION + mlp]


def build_rules(model: ModelConfig) -> List[Rule]:
    """Every parameter of the model in streaming order: embedding, layers, final norm, output."""
    rules = [Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "copy")]
    for layer in range(model.num_layers):
        rules += _layer_rules(model, layer)
    rules.append(Rule("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not model.tie_word_embeddings:
        # NOTE: tied checkpoints have no lm_head.weight; Megatron has no output layer weight then.
        rules.append(Rule("output_layer.weight", ("lm_head.weight",), "copy"))
    return rules


def group_by_layer(rules: Sequence[Rule]) -> Iterator[List[Rule]]:
    """Consecutive rules of one layer; each non-layer rule (embedding, norm, output) alone."""
    group: List[Rule] = []
    for rule in rules:
        if group and (rule.layer is None or rule.layer != group[-1].layer):
            yield group
            group = []
        group.append(rule)
    if group:
        yield group


def _fuse_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    g, d, rest = model.num_query_groups, model.head_dim, q.shape[1:]  # rest: [h] (weight) or [] (bias)
    q = q.reshape(g, -1, d, *rest)  # [g, heads/g, d, *rest]
    k = k.reshape(g, 1, d, *rest)
    v = v.reshape(g, 1, d, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)  # [g*(heads/g+2)*d, *rest]


def _split_qkv(qkv: torch.Tensor, model: ModelConfig) -> List[torch.Tensor]:
    g, d, rest = model.num_query_groups, model.head_dim, qkv.shape[1:]
    per_group = model.num_attention_heads // g
    parts = qkv.reshape(g, per_group + 2, d, *rest).split([per_group, 1, 1], dim=1)
    return [p.reshape(-1, *rest) for p in parts]  # q: [heads*d, *rest], k and v: [g*d, *rest]


_FUSE: Dict[str, Callable[..., torch.Tensor]] = {
    "copy": lambda t, model: t,
    "qkv": _fuse_qkv,
    "glu": lambda gate, up, model: torch.cat([gate, up], dim=0),  # [2*ffn, h]
}
_SPLIT: Dict[str, Callable[[torch.Tensor, ModelConfig], List[torch.Tensor]]] = {
    "copy": lambda t, model: [t],
    "qkv": _split_qkv,
    "glu": lambda t, model: list(t.chunk(2, dim=0)),  # gate, up: [ffn, h] each
}


def to_mcore(rule: Rule, tensors: Sequence[torch.Tensor], model: ModelConfig) -> torch.Tensor:
    """The megatron parameter of ``rule`` from its HF tensors (in ``rule.hf`` order)."""
    return _FUSE[rule.layout](*tensors, model)


def to_hf(rule: Rule, tensor: torch.Tensor, model: ModelConfig) -> List[torch.Tensor]:
    """The HF tensors of ``rule`` (in ``rule.hf`` order) from its megatron parameter."""
    return [t.contiguous() for t in _SPLIT[rule.layout](tensor, model)]
