"""Hugging Face Qwen2.5 / Qwen2-MoE directory -> Megatron distributed checkpoint.

The checkpoint is written at TP1/PP1 in megatron's layout-independent format, so the
trainer loads it at any TP/PP/VPP/DP layout (``checkpoint.load=OUT``). Every input
tensor is checked against the config before the first byte is written, then each one
is read, fused and written in turn: memory holds about one tensor. The source's tokenizer
files are kept, unchanged, in the checkpoint's ``tokenizer/`` (``mcore-to-hf`` exports them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Dict

import torch

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.convert.hf_config import config_dtype, model_config_from_hf, model_name, read_config_json
from megatron_qwen.convert.hf_files import TOKENIZER_FILES, HFWeights, copy_tokenizer
from megatron_qwen.convert.mapping import to_mcore
from megatron_qwen.convert.mcore_files import write_checkpoint
from megatron_qwen.convert.mcore_layout import MegatronLayout, single_process_megatron
from megatron_qwen.convert.progress import LayerProgress
from megatron_qwen.convert.run_files import TOKENIZER_DIR, write_run_files
from megatron_qwen.convert.staging import ConvertError, staged_output

EMBEDDING = "model.embed_tokens.weight"


def check_hf_tensors(layout: MegatronLayout, weights: HFWeights) -> None:
    """Raises unless the HF files hold exactly the tensors the config implies, with their shapes."""
    expected = layout.hf_shapes()
    problems = [f"{n}: missing" for n in expected if n not in weights.shapes]
    problems += [f"{n}: shape {weights.shapes[n]}, config.json implies {s}"
                 for n, s in expected.items() if n in weights.shapes and weights.shapes[n] != s]
    # A tied model may still carry a copy of the embedding as lm_head.weight.
    ignorable = {"lm_head.weight"} if layout.model.tie_word_embeddings else set()
    problems += [f"{n}: not part of a model of this config" for n in sorted(weights.shapes)
                 if n not in expected and n not in ignorable and not n.endswith("rotary_emb.inv_freq")]
    if problems:
        raise ConvertError(f"{weights.dir} does not match its config.json: " + "; ".join(problems[:6])
                           + (f" (and {len(problems) - 6} more)" if len(problems) > 6 else ""))


def _storage_dtype(weights: HFWeights, raw: Dict) -> torch.dtype:
    # The checkpoint keeps the dtype the weights are stored in (bf16 stays bf16).
    return weights.dtypes.get(EMBEDDING) or config_dtype(raw) or torch.float32


def hf_to_mcore(hf_dir: Path, out_dir: Path, progress: bool = True) -> ModelConfig:
    """Converts ``hf_dir`` into a megatron checkpoint at ``out_dir``; returns the model config."""
    hf_dir = Path(hf_dir)
    raw = read_config_json(hf_dir)
    model = model_config_from_hf(raw, model_name(hf_dir), source=str(hf_dir / "config.json"))
    weights = HFWeights(hf_dir)
    dtype = _storage_dtype(weights, raw)
    with staged_output(Path(out_dir)) as tmp, single_process_megatron(model):
        layout = MegatronLayout(model, dtype)
        check_hf_tensors(layout, weights)
        rules = {rule.mcore: rule for rule in layout.rules}
        bar = LayerProgress(model.num_layers, "hf-to-mcore", progress)

        def param_value(name: str) -> torch.Tensor:
            rule = rules[name]
            bar.at(rule.layer)
            return to_mcore(rule, [weights.get(n) for n in rule.hf], model)

        write_checkpoint(layout, tmp, param_value)
        bar.close()
        write_run_files(tmp, model)
        if any((hf_dir / name).is_file() for name in TOKENIZER_FILES):
            (tmp / TOKENIZER_DIR).mkdir()
            copy_tokenizer(hf_dir, tmp / TOKENIZER_DIR)
    return model
