"""Tiny random Hugging Face Qwen2 models for the conversion tests (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import torch
from safetensors import safe_open
from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

from megatron_qwen.convert.random_hf import make_hf_model  # noqa: F401 (re-exported for the tests)


def make_hf_moe_model(path: Path, *, layers: int = 2, experts: int = 4, sparse_step: int = 1, seed: int = 0) -> Path:
    """Saves a random Qwen2MoeForCausalLM (routed experts, shared expert and its gate); returns ``path``."""
    config = Qwen2MoeConfig(vocab_size=256, hidden_size=48, intermediate_size=96, moe_intermediate_size=32,
                            shared_expert_intermediate_size=64, num_experts=experts, num_experts_per_tok=2,
                            decoder_sparse_step=sparse_step, num_hidden_layers=layers, num_attention_heads=6,
                            num_key_value_heads=2, max_position_embeddings=128, rope_theta=1e6, rms_norm_eps=1e-6,
                            tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = Qwen2MoeForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.save_pretrained(path)
    return Path(path)


def read_tensors(hf_dir: Path) -> Dict[str, torch.Tensor]:
    """Every tensor of an HF directory (single file or sharded with an index)."""
    index = Path(hf_dir) / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() \
        else ["model.safetensors"]
    tensors = {}
    for name in files:
        with safe_open(str(Path(hf_dir) / name), framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors
