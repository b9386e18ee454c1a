"""The tiny Qwen2-MoE on one gloo rank: Hugging Face structure parity and the aux loss's effect.

In-process (no torchrun): a single-rank process group and megatron's parallel state are
set up once for the module.
"""

from pathlib import Path
from typing import Dict, Iterator

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from megatron_qwen.config import validate
from megatron_qwen.config.params import count_parameters
from megatron_qwen.config.schema import Config
from megatron_qwen.config.store import register

CONF = str(Path(__file__).resolve().parent.parent / "conf")
VOCAB, SEQ = 256, 32


def tiny_moe(*overrides: str) -> Config:
    register()
    with initialize_config_dir(config_dir=CONF, version_base="1.3"):
        dcfg = compose(config_name="config", overrides=["model=qwen2_moe_tiny", f"model.vocab_size={VOCAB}",
                                                        f"train.seq_length={SEQ}", *overrides])
    return validate(OmegaConf.to_object(dcfg), world_size=1)


@pytest.fixture(scope="module")
def single_rank():
    from megatron_qwen.platform.launch import detect_process_env, init_process_group
    from megatron_qwen.platform.parallel import destroy, init_model_parallel

    cfg = tiny_moe()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: threads only add contention on a shared CPU
    init_process_group(detect_process_env({}))
    init_model_parallel(cfg)
    yield cfg
    destroy()
    torch.set_num_threads(threads)


def build(cfg: Config):
    from megatron_qwen.config.translate import to_transformer_config
    from megatron_qwen.model.build import build_model

    return build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed)


def hf_model(cfg: Config):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    m = cfg.model
    config = Qwen2MoeConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_size, intermediate_size=m.ffn_hidden_size,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_attention_heads,
        num_key_value_heads=m.num_query_groups, max_position_embeddings=m.max_position_embeddings,
        rms_norm_eps=m.rms_norm_eps, tie_word_embeddings=m.tie_word_embeddings,
        rope_parameters={"rope_type": "default", "rope_theta": m.rope_theta},
        decoder_sparse_step=m.moe_layer_freq, moe_intermediate_size=m.moe_ffn_hidden_size,
        shared_expert_intermediate_size=m.moe_shared_expert_ffn_hidden_size,
        num_experts_per_tok=m.moe_router_topk, num_experts=m.num_experts, norm_topk_prob=m.moe_norm_topk_prob,
        qkv_bias=True)
    return Qwen2MoeForCausalLM(config).eval()


def test_parameter_count_matches_transformers(single_rank):
    cfg = single_rank
    ours = sum(p.numel() for chunk in build(cfg) for p in chunk.parameters())
    theirs = sum(p.numel() for p in hf_model(cfg).parameters())
    assert ours == theirs == count_parameters(cfg.model).total


def _split_qkv(w: torch.Tensor, m) -> Dict[str, torch.Tensor]:
    # megatron interleaves per KV group: [ng, (q_per_group + 2) * hn, ...] = [q..., k, v] per group.
    per_group = m.num_attention_heads // m.num_query_groups
    w = w.reshape(m.num_query_groups, per_group + 2, m.head_dim, *w.shape[1:])
    return {"q": w[:, :per_group].flatten(0, 2), "k": w[:, per_group].flatten(0, 1),
            "v": w[:, per_group + 1].flatten(0, 1)}


def _load_into_hf(ours: Dict[str, torch.Tensor], hf, m) -> None:
    """Copies our (EP1) weights into the HF model: the structural correspondence of the MoE block."""
    sd = {"model.embed_tokens.weight": ours["embedding.word_embeddings.weight"],
          "model.norm.weight": ours["decoder.final_layernorm.weight"], "lm_head.weight": ours["output_layer.weight"]}
    for i in range(m.num_layers):
        src, dst = f"decoder.layers.{i}.", f"model.layers.{i}."
        for kind in ("weight", "bias"):
            for proj, value in _split_qkv(ours[src + f"self_attention.linear_qkv.{kind}"], m).items():
                sd[dst + f"self_attn.{proj}_proj.{kind}"] = value
        sd[dst + "self_attn.o_proj.weight"] = ours[src + "self_attention.linear_proj.weight"]
        sd[dst + "input_layernorm.weight"] = ours[src + "input_layernorm.weight"]
        sd[dst + "post_attention_layernorm.weight"] = ours[src + "pre_mlp_layernorm.weight"]
        sd[dst + "mlp.gate.weight"] = ours[src + "mlp.router.weight"]
        experts = range(m.num_experts)
        # linear_fc1 is [gate; up], exactly HF's fused gate_up_proj per expert.
        sd[dst + "mlp.experts.gate_up_proj"] = torch.stack(
            [ours[src + f"mlp.experts.local_experts.{e}.linear_fc1.weight"] for e in experts])
        sd[dst + "mlp.experts.down_proj"] = torch.stack(
            [ours[src + f"mlp.experts.local_experts.{e}.linear_fc2.weight"] for e in experts])
        gate, up = ours[src + "mlp.shared_experts.linear_fc1.weight"].chunk(2)
        sd[dst + "mlp.shared_expert.gate_proj.weight"], sd[dst + "mlp.shared_expert.up_proj.weight"] = gate, up
        sd[dst + "mlp.shared_expert.down_proj.weight"] = ours[src + "mlp.shared_experts.linear_fc2.weight"]
        sd[dst + "mlp.shared_expert_gate.weight"] = ours[src + "mlp.shared_experts.gate_weight"]
    missing, unexpected = hf.load_state_dict(sd, strict=True)
    assert not missing and not unexpected


@torch.no_grad()
def test_logits_match_transformers(single_rank):
    """Router (softmax, top-k, no renormalization), SwiGLU experts and the sigmoid-gated
    shared expert compute what Qwen2MoeForCausalLM computes."""
    cfg = single_rank
    (chunk,) = build(cfg)
    chunk.eval()
    ours = {k: v for k, v in chunk.state_dict().items() if "_extra_state" not in k}
    hf = hf_model(cfg)
    _load_into_hf(ours, hf, cfg.model)
    tokens = torch.randint(0, VOCAB, (2, SEQ), generator=torch.Generator().manual_seed(0))
    position_ids = torch.arange(SEQ).expand_as(tokens)
    got = chunk(tokens, position_ids, None)  # [b, s, V]
    want = hf(input_ids=tokens).logits
    assert got.shape == want.shape
    assert (got - want).abs().max().item() <= 1e-4


def skewed_batches(batch: int, seed: int) -> Iterator[Dict[str, torch.Tensor]]:
    """Zipf-distributed token ids (p(i) ~ 1/(i+1)^1.5): a handful of ids make up most of
    the batch, so without balancing the router sends most tokens to the same experts."""
    gen = torch.Generator().manual_seed(seed)
    weights = 1.0 / torch.arange(1, VOCAB + 1, dtype=torch.float) ** 1.5
    while True:
        ids = torch.multinomial(weights, batch * (SEQ + 1), replacement=True, generator=gen).view(batch, SEQ + 1)
        yield {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(batch, SEQ)}


def train_and_measure(cfg: Config, steps: int, window: int) -> float:
    """Trains on skewed batches; mean load imbalance over the last ``window`` steps."""
    from megatron_qwen.training.moe_metrics import MoEMetrics
    from megatron_qwen.training.optim import build_optimizer, build_scheduler, wrap_model
    from megatron_qwen.training.stages.lm import LanguageModelStage
    from megatron_qwen.training.step import train_step

    model = wrap_model(cfg, build(cfg))
    optimizer = build_optimizer(cfg, model)
    scheduler = build_scheduler(cfg, optimizer, steps)
    metrics = MoEMetrics(model, cfg, torch.device("cpu"))
    batches = skewed_batches(cfg.train.micro_batch_size, seed=7)
    for step in range(steps):
        if step == steps - window:
            metrics.collect()  # discard the statistics of the earlier steps
        train_step(LanguageModelStage(cfg), model, optimizer, scheduler, [batches], 1, SEQ,
                   cfg.train.micro_batch_size)
    record = metrics.collect()
    metrics.close()
    return record["moe_imbalance"]


def test_aux_loss_lowers_imbalance_on_skewed_batch(single_rank):
    overrides = ["train.micro_batch_size=4", "train.global_batch_size=4", "optim.warmup_iters=0",
                 "optim.decay_style=constant", "optim.lr=1e-3", "optim.min_lr=1e-3"]
    without = train_and_measure(tiny_moe(*overrides, "model.moe_aux_loss_coeff=0"), steps=40, window=10)
    # A large coefficient makes the effect visible within 40 steps (Qwen trains with 1e-3).
    with_aux = train_and_measure(tiny_moe(*overrides, "model.moe_aux_loss_coeff=1.0"), steps=40, window=10)
    print(f"imbalance (max/mean tokens per expert): coeff 0 -> {without:.3f}, coeff 1.0 -> {with_aux:.3f}")
    assert without > 3.0  # routing collapsed onto few experts (4.0 = every token shares one expert)
    assert with_aux < 0.8 * without
