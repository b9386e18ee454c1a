"""Initialization by parameter role, checked against Transformer Engine's parameter names.

TE cannot be installed here, but the names and owner classes of a TE-spec GPTModel are fixed
by megatron-core 0.16.1's ``get_gpt_layer_with_transformer_engine_spec`` (TE's fused
norm+linear modules call their norm scale ``layer_norm_weight``). A stand-in model with
exactly those names and owner class names must start from the same values as the local spec:
the name-suffix rule it replaces left every fused norm at zero (dense MLPs output zero).
"""

from typing import Dict, Tuple

import pytest
import torch

from megatron_qwen.config import validate
from megatron_qwen.config.store import compose_config
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.model.build import build_model
from megatron_qwen.model.init import Role, check_norm_weights, init_weights, param_role
from tests.data_support import destroy_single_rank, init_single_rank


# Stand-ins named like the classes megatron's TE spec instantiates (owner class -> role).
class LayerNormLinear(torch.nn.Module):  # transformer_engine.pytorch.LayerNormLinear
    pass


class TELayerNormColumnParallelLinear(LayerNormLinear):  # megatron.core.extensions.transformer_engine
    pass


class TERowParallelLinear(torch.nn.Module):
    pass


class TEColumnParallelLinear(torch.nn.Module):
    pass


class TEColumnParallelGroupedLinear(torch.nn.Module):
    pass


class TERowParallelGroupedLinear(torch.nn.Module):
    pass


class RMSNorm(torch.nn.Module):  # transformer_engine.pytorch.RMSNorm, what TENorm returns
    pass


class TopKRouter(torch.nn.Module):
    pass


class SharedExpertMLP(torch.nn.Module):
    pass


class VocabParallelEmbedding(torch.nn.Module):
    pass


# Per-layer parameters of the TE spec: name -> (owner class, local-spec name of the same parameter).
TE_DENSE_LAYER = {
    "self_attention.linear_qkv.layer_norm_weight": (TELayerNormColumnParallelLinear, "input_layernorm.weight"),
    "self_attention.linear_qkv.weight": (TELayerNormColumnParallelLinear, "self_attention.linear_qkv.weight"),
    "self_attention.linear_qkv.bias": (TELayerNormColumnParallelLinear, "self_attention.linear_qkv.bias"),
    "self_attention.linear_proj.weight": (TERowParallelLinear, "self_attention.linear_proj.weight"),
    "mlp.linear_fc1.layer_norm_weight": (TELayerNormColumnParallelLinear, "pre_mlp_layernorm.weight"),
    "mlp.linear_fc1.weight": (TELayerNormColumnParallelLinear, "mlp.linear_fc1.weight"),
    "mlp.linear_fc2.weight": (TERowParallelLinear, "mlp.linear_fc2.weight"),
}
TE_MOE_MLP = {  # MoE layers: a separate TENorm before the router, grouped experts
    "pre_mlp_layernorm.weight": (RMSNorm, "pre_mlp_layernorm.weight"),
    "mlp.router.weight": (TopKRouter, "mlp.router.weight"),
    "mlp.shared_experts.gate_weight": (SharedExpertMLP, "mlp.shared_experts.gate_weight"),
    "mlp.shared_experts.linear_fc1.weight": (TEColumnParallelLinear, "mlp.shared_experts.linear_fc1.weight"),
    "mlp.shared_experts.linear_fc2.weight": (TERowParallelLinear, "mlp.shared_experts.linear_fc2.weight"),
}
TE_TOP = {
    "embedding.word_embeddings.weight": (VocabParallelEmbedding, "embedding.word_embeddings.weight"),
    "decoder.final_layernorm.weight": (RMSNorm, "decoder.final_layernorm.weight"),
}


def _te_names(cfg) -> Dict[str, Tuple[type, str]]:
    """Every parameter of the TE-spec model of ``cfg`` (one stage, tied embeddings)."""
    names = dict(TE_TOP)
    attention = {k: v for k, v in TE_DENSE_LAYER.items() if k.startswith("self_attention.")}
    for i in range(cfg.model.num_layers):
        layer = dict(attention)
        if cfg.model.num_experts is None:
            layer.update(TE_DENSE_LAYER)
        else:
            layer.update(TE_MOE_MLP)
            for e in range(cfg.model.num_experts):
                layer[f"mlp.experts.linear_fc1.weight{e}"] = (
                    TEColumnParallelGroupedLinear, f"mlp.experts.local_experts.{e}.linear_fc1.weight")
                layer[f"mlp.experts.linear_fc2.weight{e}"] = (
                    TERowParallelGroupedLinear, f"mlp.experts.local_experts.{e}.linear_fc2.weight")
        names.update({f"decoder.layers.{i}.{k}": (owner, f"decoder.layers.{i}.{local}")
                      for k, (owner, local) in layer.items()})
    return names


def _stand_in_model(cfg, local: Dict[str, torch.Tensor]) -> torch.nn.Module:
    """A module tree with the TE spec's names, owner classes and (local) shapes."""
    root = torch.nn.Module()
    root.decoder = torch.nn.Module()
    root.decoder.layers = torch.nn.ModuleList()
    for i in range(cfg.model.num_layers):
        layer = torch.nn.Module()
        layer.layer_number = i + 1
        root.decoder.layers.append(layer)
    for name, (owner_cls, local_name) in _te_names(cfg).items():
        *path, attr = name.split(".")
        module = root
        for part in path:
            if part.isdigit():
                module = module[int(part)]
                continue
            if not hasattr(module, part):
                module.add_module(part, torch.nn.Module())
            module = getattr(module, part)
        if type(module) is torch.nn.Module and module is not root:
            module.__class__ = owner_cls  # the leaf module owns the parameter
        module.register_parameter(attr, torch.nn.Parameter(torch.full_like(local[local_name], 7.0)))
    return root


@pytest.fixture(scope="module", params=["qwen2_5_tiny", "qwen2_moe_tiny"])
def cfg(request):
    config = validate(compose_config([f"model={request.param}", "model.vocab_size=256"]), 1)
    init_single_rank(config)
    yield config
    destroy_single_rank()


def test_te_spec_parameters_start_as_the_local_spec_does(cfg):
    local_chunk = build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed)[0]
    local = dict(local_chunk.named_parameters())
    te = _stand_in_model(cfg, local)
    init_weights(te, cfg.model, cfg.train.seed)
    te_params = dict(te.named_parameters())
    assert len(te_params) == len(_te_names(cfg))
    for name, (_, local_name) in _te_names(cfg).items():
        assert torch.equal(te_params[name], local[local_name]), f"{name} vs {local_name}"
    norms = [n for n in te_params if n.endswith("layer_norm_weight")]
    assert norms and all(bool((te_params[n] == 1).all()) for n in norms)
    check_norm_weights(te)  # two norms per layer, all ones


def test_zero_norms_fail_the_build_invariant(cfg):
    local = dict(build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed)[0].named_parameters())
    te = _stand_in_model(cfg, local)
    init_weights(te, cfg.model, cfg.train.seed)
    with torch.no_grad():
        te.decoder.layers[0].self_attention.linear_qkv.layer_norm_weight.zero_()
    with pytest.raises(RuntimeError, match="layer 1: norm scales"):
        check_norm_weights(te)


def test_roles_follow_the_owner_not_the_name():
    assert param_role(TELayerNormColumnParallelLinear(), "layer_norm_weight", 1) is Role.NORM
    assert param_role(TELayerNormColumnParallelLinear(), "layer_norm_bias", 1) is Role.BIAS
    assert param_role(TELayerNormColumnParallelLinear(), "weight", 2) is Role.WEIGHT
    assert param_role(RMSNorm(), "weight", 1) is Role.NORM
    assert param_role(TERowParallelGroupedLinear(), "weight3", 2) is Role.RESIDUAL_OUT
    assert param_role(torch.nn.Linear(2, 2), "weight", 2) is Role.WEIGHT
    with pytest.raises(ValueError, match="no initialization rule for the 1-D parameter 'scale'"):
        param_role(torch.nn.Module(), "scale", 1)
