"""The memory-per-GPU estimator (pure arithmetic, no process group)."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_qwen.config import validate
from megatron_qwen.config.memory import (bytes_per_param, estimate_memory, gathered_kv_bytes, in_flight_layers,
                                         layer_activation_bytes, stage_layers)
from megatron_qwen.config.params import count_parameters
from megatron_qwen.config.schema import Config, ModelConfig, ParallelConfig, PrecisionConfig, TrainConfig

QWEN_72B = ModelConfig(name="qwen2_5_72b", num_layers=80, hidden_size=8192, ffn_hidden_size=29568,
                       num_attention_heads=64, num_query_groups=8, vocab_size=152064, tie_word_embeddings=False,
                       max_position_embeddings=131072)


def make(model: ModelConfig = QWEN_72B, world: int = 64, dtype: str = "bf16", **parallel) -> Config:
    layout = dict(tp=8, pp=4, vpp=5, sp=True, use_distributed_optimizer=True, recompute="selective")
    layout.update(parallel)
    cfg = Config(model=model, parallel=ParallelConfig(**layout), precision=PrecisionConfig(dtype=dtype),
                 train=TrainConfig(seq_length=4096, micro_batch_size=1, global_batch_size=512))
    return validate(cfg, world)


@pytest.mark.parametrize("dp, expected", [(1, 18.0), (2, 12.0), (8, 7.5)])
def test_mixed_precision_distributed_optimizer_is_6_plus_12_over_dp(dp, expected):
    assert bytes_per_param(make(world=32 * dp), shards=dp) == expected


def test_without_distributed_optimizer_every_rank_holds_18_bytes_and_fp32_16():
    assert bytes_per_param(make(use_distributed_optimizer=False, overlap_param_gather=False), shards=4) == 18
    assert bytes_per_param(make(dtype="fp32", use_distributed_optimizer=False), shards=4) == 16


def test_pipeline_stages_hold_every_parameter_exactly_once():
    cfg = make(world=4, tp=1, sp=False)
    assert sum(stage.params for stage in estimate_memory(cfg).stages) == count_parameters(cfg.model).total


def test_tensor_parallelism_splits_all_but_the_norms():
    split = sum(stage.params for stage in estimate_memory(make()).stages)
    norms = (2 * 80 + 1) * 8192
    assert split == (count_parameters(QWEN_72B).total - norms) / 8 + norms


def test_interleaved_stages_own_round_robin_chunks():
    assert stage_layers(8, pp=2, vpp=2, rank=0) == [0, 1, 4, 5]
    assert stage_layers(8, pp=2, vpp=2, rank=1) == [2, 3, 6, 7]
    assert stage_layers(8, pp=2, vpp=1, rank=1) == [4, 5, 6, 7]


def test_uneven_pipelines_own_contiguous_blocks_of_their_size():
    assert [stage_layers(3, pp=2, vpp=1, rank=r, first=2) for r in (0, 1)] == [[0, 1], [2]]
    assert [len(stage_layers(30, pp=4, vpp=1, rank=r, first=6, last=6)) for r in range(4)] == [6, 9, 9, 6]


def test_layer_activations_count_each_saved_tensor():
    # bf16, tp 4 with SP, n = 2048 tokens: norms and linear inputs 16*n*h/t, attention
    # 6*n*(q + g)/t plus the fp32 log-sum-exp, SwiGLU 6*n*ffn/t, RoPE's cos/sin.
    model = dataclasses.replace(QWEN_72B, hidden_size=768, ffn_hidden_size=2048, num_attention_heads=8,
                                num_query_groups=4, num_layers=4)
    cfg = make(model, world=4, tp=4, pp=1, vpp=None)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_length=1024, micro_batch_size=2,
                                                             global_batch_size=2))
    n, h, q, g, t = 2048, 768, 768, 384, 4
    expected = (16 * n * h + 8 * n) / t + (6 * n * (q + g) + 4 * n * 8 + 6 * n * 2048) / t + 4 * 2 * 1024 * 96
    assert layer_activation_bytes(cfg, 0) == pytest.approx(expected)
    unfused = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, fusions=False))
    assert layer_activation_bytes(unfused, 0) - layer_activation_bytes(cfg, 0) == pytest.approx(4 * n * 2048 / t)


def test_sequence_parallel_and_full_recompute_shrink_activations():
    selective = layer_activation_bytes(make(), 0)
    assert layer_activation_bytes(make(sp=False), 0) > selective
    assert layer_activation_bytes(make(recompute="full"), 0) < selective / 10


def test_context_parallel_splits_activations_and_adds_the_gathered_kv():
    cp1, cp4 = make(world=64, tp=8, pp=4), make(world=256, tp=8, pp=4, cp=4)
    # 8 KV heads over tp=8: one per rank, head dim 128, bf16; K and V of the 3/4 of 4096 positions held elsewhere.
    assert gathered_kv_bytes(cp4) == 2 * 3072 * 1 * 1 * 128 * 2 and gathered_kv_bytes(cp1) == 0
    assert layer_activation_bytes(cp4, 0) == pytest.approx(layer_activation_bytes(cp1, 0) / 4 + gathered_kv_bytes(cp4))
    assert estimate_memory(cp4).peak.activations < estimate_memory(cp1).peak.activations / 3


def test_first_stage_holds_pp_microbatches_under_1f1b_and_megatrons_penalty_when_interleaved():
    plain = make(vpp=None)
    assert [in_flight_layers(plain, r, 256) for r in range(4)] == [80.0, 60.0, 40.0, 20.0]
    assert in_flight_layers(plain, 0, num_microbatches=2) == 40.0  # fewer micro-batches than stages
    # megatron's interleaved schedule: pp * (1 + (pp - 1) / (pp * vpp)) = 4.6 stage-micro-batches.
    assert in_flight_layers(make(), 0, 256) == pytest.approx(4.6 * 20)


def test_logits_live_on_the_last_stage_only():
    stages = estimate_memory(make()).stages
    assert [s.logits > 0 for s in stages] == [False, False, False, True]
    # The fp32 softmax kept for backward and the bf16 logits it is computed from, split over tp;
    # the final norm's and the output layer's inputs (split by SP); int64 targets and a mask.
    n, h = 4096, 8192
    assert stages[-1].logits == (4 + 2) * n * 152064 / 8 + (8 * n * h + 4 * n) / 8 + 9 * n


def test_72b_layout_fits_an_h100_and_more_data_parallelism_lowers_it():
    at_8_nodes, at_16_nodes = estimate_memory(make(world=64)).peak, estimate_memory(make(world=128)).peak
    assert at_8_nodes.total < 60 * 2**30
    assert at_16_nodes.total < at_8_nodes.total


def test_the_estimate_needs_a_validated_config():
    with pytest.raises(ValueError, match="validated"):
        estimate_memory(Config())


def test_routed_experts_are_split_over_expert_parallel_ranks():
    moe = ModelConfig(name="moe", num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=4,
                      num_query_groups=2, vocab_size=1024, num_experts=8, moe_ffn_hidden_size=128, moe_router_topk=2,
                      moe_shared_expert_ffn_hidden_size=256)
    expert_params = 4 * 8 * 3 * 256 * 128

    def held(ep: int) -> int:
        return estimate_memory(make(moe, world=8, tp=1, pp=1, vpp=None, sp=False, ep=ep)).peak.params

    assert held(1) == count_parameters(moe).total
    assert held(1) - held(4) == expert_params * 3 // 4
