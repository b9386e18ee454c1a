"""Qwen2-MoE configs: composed presets, parameter counts, validation and translation (no process group)."""

import dataclasses
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.params import count_parameters, flops_per_token, moe_layer_pattern
from megatron_qwen.config.schema import Config
from megatron_qwen.config.store import register

CONF = str(Path(__file__).resolve().parent.parent / "conf")


def composed(*overrides: str) -> Config:
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        return OmegaConf.to_object(compose(config_name="config", overrides=list(overrides)))


def test_57b_a14b_counts():
    counts = count_parameters(composed("model=qwen2_moe_57b_a14b").model)
    assert round(counts.total / 1e9, 1) == 57.4
    assert round(counts.active / 1e9, 1) == 14.2


def test_a2_7b_counts():
    # Qwen1.5-MoE-A2.7B: 14.3B total, 2.7B activated (model card).
    counts = count_parameters(composed("model=qwen2_moe_a2_7b").model)
    assert round(counts.total / 1e9, 1) == 14.3
    assert round(counts.active / 1e9, 1) == 2.7


def test_moe_flops_count_only_active_experts():
    m = composed("model=qwen2_moe_tiny").model
    dense_equivalent = dataclasses.replace(
        m, num_experts=None, ffn_hidden_size=m.moe_router_topk * m.moe_ffn_hidden_size
        + m.moe_shared_expert_ffn_hidden_size)
    router = 6 * m.num_layers * m.hidden_size * m.num_experts
    assert flops_per_token(m, 32) == flops_per_token(dense_equivalent, 32) + router


def test_layer_pattern_follows_hf_decoder_sparse_step():
    m = composed("model=qwen2_moe_tiny").model
    assert moe_layer_pattern(m) == [1, 1, 1, 1]
    # HF: layer i is sparse when (i + 1) % decoder_sparse_step == 0.
    assert moe_layer_pattern(dataclasses.replace(m, moe_layer_freq=2)) == [0, 1, 0, 1]


@pytest.mark.parametrize("world,overrides", [
    (2, ["parallel.ep=2"]),
    (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"]),
    (4, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true", "parallel.etp=1"]),
    (4, ["parallel.ep=2", "parallel.pp=2"]),
])
def test_tiny_moe_layouts_validate(world, overrides):
    cfg = validate(composed("model=qwen2_moe_tiny", *overrides), world)
    assert cfg.parallel.dp == world // (cfg.parallel.tp * cfg.parallel.pp)


@pytest.mark.parametrize("world,overrides,message", [
    (3, ["parallel.ep=3"], "num_experts=8 is not divisible by parallel.ep=3"),
    (2, ["parallel.ep=2", "parallel.tp=2", "parallel.sp=true"], "etp*ep*pp = 2*2*1 = 4"),
    (2, ["parallel.tp=2"], "needs parallel.sp=true"),
    (1, ["model.moe_shared_expert_ffn_hidden_size=null"], "moe_shared_expert_gate=true needs"),
    (1, ["model.moe_pad_to_capacity=true"], "moe_pad_to_capacity=true needs model.moe_capacity_factor"),
    (1, ["model.moe_token_drop_policy=random"], "moe_token_drop_policy='random'"),
    (1, ["model.moe_router_topk=9"], "moe_router_topk=9 must be in [1, num_experts=8]"),
])
def test_invalid_moe_layouts_are_named(world, overrides, message):
    with pytest.raises(ConfigError) as err:
        validate(composed("model=qwen2_moe_tiny", *overrides), world)
    assert message in str(err.value)


def test_ep_needs_experts():
    with pytest.raises(ConfigError, match="needs an MoE model"):
        validate(composed("model=qwen2_5_tiny", "parallel.ep=2"), 2)


def test_translation_matches_qwen2_moe_semantics():
    from megatron_qwen.config.translate import to_transformer_config

    cfg = validate(composed("model=qwen2_moe_tiny", "model.moe_capacity_factor=1.5",
                            "model.moe_token_drop_policy=position"), 1)
    tc = to_transformer_config(cfg)
    # Qwen2-MoE: softmax over all experts, then top-k, no renormalization.
    assert tc.moe_router_score_function == "softmax" and tc.moe_router_pre_softmax
    assert tc.moe_shared_expert_gate and tc.moe_shared_expert_intermediate_size == 64
    assert tc.moe_layer_freq == [1, 1, 1, 1]
    assert (tc.moe_expert_capacity_factor, tc.moe_token_drop_policy) == (1.5, "position")
    renorm = to_transformer_config(validate(composed("model=qwen2_moe_tiny", "model.moe_norm_topk_prob=true"), 1))
    assert not renorm.moe_router_pre_softmax  # softmax over the top-k logits = renormalized top-k
