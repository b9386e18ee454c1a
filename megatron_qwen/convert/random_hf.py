"""Random Hugging Face Qwen2 models (nothing is downloaded): for conversion checks and tests."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, Optional

import torch
from transformers import Qwen2Config, Qwen2ForCausalLM


def make_hf_model(path: Path, *, layers: int = 2, hidden: int = 48, ffn: int = 96, heads: int = 6, kv: int = 2,
                  vocab: int = 256, tied: bool = False, dtype: torch.dtype = torch.float32, seed: int = 0,
                  max_positions: int = 128, rope_scaling: Optional[Dict] = None) -> Path:
    """Saves a random Qwen2ForCausalLM with ``save_pretrained``; returns ``path``.

    Every parameter is random, norms and QKV biases included: a mapping that swaps two
    norms or mis-orders the bias cannot hide behind their all-ones / all-zeros init.
    """
    config = Qwen2Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                         max_position_embeddings=max_positions, rope_theta=1e6, rms_norm_eps=1e-6,
                         rope_scaling=dict(rope_scaling) if rope_scaling else None)  # (transformers edits it)
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.2)
    model.to(dtype).save_pretrained(path)
    return Path(path)
