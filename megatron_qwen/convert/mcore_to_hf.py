"""Megatron checkpoint (any TP/PP/VPP/DP/EP layout) -> Hugging Face Qwen2.5 / Qwen2-MoE directory.

One layer's parameters are read at a time (megatron gathers them from whatever chunks
the trainer saved), split through the mapping table and appended to the safetensors
shard they were planned into; memory holds about one layer (or the embedding).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional

import torch

from megatron_qwen.config.long_context import check_rope_scaling
from megatron_qwen.config.schema import ModelConfig, RopeScalingConfig
from megatron_qwen.convert.hf_config import generation_config, hf_config_from_model
from megatron_qwen.convert.hf_files import ShardWriter, copy_tokenizer
from megatron_qwen.convert.mapping import Rule, group_by_layer, to_hf
from megatron_qwen.convert.mcore_files import check_compatible, check_complete, read_params, stored_tensors
from megatron_qwen.convert.mcore_layout import MegatronLayout, single_process_megatron
from megatron_qwen.convert.progress import LayerProgress
from megatron_qwen.convert.run_files import checkpoint_tokenizer, read_model_config, resolve_checkpoint
from megatron_qwen.convert.staging import ConvertError, staged_output
from megatron_qwen.data.tokenizer import TokenizerError, qwen2_5_tokenizer_json, write_qwen2_5_tokenizer

DEFAULT_SHARD_SIZE = 5 * 10**9  # transformers' default max_shard_size="5GB"
ROW_BLOCK_BYTES = 128 * 2**20
_EMBEDDING_KEY = "embedding.word_embeddings.weight"


def stored_dtype(ckpt_dir: Path) -> torch.dtype:
    """The dtype the checkpoint's model tensors are stored in (one dtype for all of them)."""
    stored = stored_tensors(ckpt_dir)
    if _EMBEDDING_KEY not in stored:
        raise ConvertError(f"{ckpt_dir} holds no {_EMBEDDING_KEY}: not a Qwen2.5 model checkpoint")
    dtypes = {t.dtype for k, t in stored.items() if k.startswith(("embedding.", "decoder.", "output_layer."))}
    if len(dtypes) != 1:
        raise ConvertError(f"{ckpt_dir} stores model tensors in several dtypes {sorted(map(str, dtypes))}")
    return dtypes.pop()


def _tokenizer_source(tokenizer: Optional[Path], ckpt: Path) -> Optional[Path]:
    """The directory whose tokenizer files the export carries; None: the default Qwen2.5 tokenizer."""
    if tokenizer is not None:
        if not Path(tokenizer).is_dir():
            raise ConvertError(f"tokenizer directory {tokenizer} does not exist")
        return Path(tokenizer)
    source = checkpoint_tokenizer(ckpt)
    if source is None:
        try:
            qwen2_5_tokenizer_json()  # derived before any output is written
        except TokenizerError as err:
            raise ConvertError(f"{err}; or pass --tokenizer DIR") from err
    return source


def _write_rows(layout: MegatronLayout, ckpt: Path, rule: Rule, writer: ShardWriter) -> None:
    """Copies a parameter in row blocks of about ``ROW_BLOCK_BYTES`` (embedding, norm, output layer)."""
    shape = layout.param_shapes[rule.mcore]
    row_bytes = shape[1:].numel() * torch.empty((), dtype=layout.dtype).element_size()
    step = max(1, ROW_BLOCK_BYTES // row_bytes)
    for start in range(0, shape[0], step):
        rows = slice(start, min(start + step, shape[0]))
        writer.write(rule.hf[0], read_params(layout, ckpt, [rule.mcore], rows)[rule.mcore])


def _write_weights(layout: MegatronLayout, ckpt: Path, out: Path, dtype: torch.dtype, shard_size: int,
                   progress: bool) -> None:
    writer = ShardWriter(out, list(layout.hf_shapes().items()), dtype, shard_size)
    bar = LayerProgress(layout.model.num_layers, "mcore-to-hf", progress)
    for rules in group_by_layer(layout.rules):
        bar.at(rules[0].layer)
        if rules[0].layer is None and rules[0].layout == "copy":  # embedding, final norm, output layer
            _write_rows(layout, ckpt, rules[0], writer)
            continue
        params = read_params(layout, ckpt, [rule.mcore for rule in rules])
        for rule in rules:
            for name, tensor in zip(rule.hf, to_hf(rule, params.pop(rule.mcore), layout.model)):
                writer.write(name, tensor)
    bar.close()
    writer.finish()


def with_rope_scaling(model: ModelConfig, rope_scaling: Optional[RopeScalingConfig]) -> ModelConfig:
    """``model`` with ``rope_scaling`` (e.g. YaRN for serving beyond the trained context); checked."""
    if rope_scaling is None:
        return model
    errors = []
    check_rope_scaling(dataclasses.replace(model, rope_scaling=rope_scaling), errors)
    if errors:
        raise ConvertError(f"invalid rope scaling {dataclasses.asdict(rope_scaling)}: " + "; ".join(errors))
    return dataclasses.replace(model, rope_scaling=rope_scaling)


def mcore_to_hf(ckpt: Path, out_dir: Path, dtype: Optional[torch.dtype] = None,
                shard_size: int = DEFAULT_SHARD_SIZE, tokenizer: Optional[Path] = None,
                progress: bool = True, rope_scaling: Optional[RopeScalingConfig] = None) -> ModelConfig:
    """Exports the checkpoint ``ckpt`` as an HF directory at ``out_dir``; returns the model config.

    ``dtype`` defaults to the dtype the checkpoint stores its weights in; ``rope_scaling``
    (default: the checkpoint's own) goes into ``config.json``: Qwen's way to serve a model
    trained at 32K tokens at 128K with YaRN. The tokenizer files come from ``tokenizer`` if given,
    else from the tokenizer the checkpoint was converted or trained with (:func:`checkpoint_tokenizer`),
    else they are the default Qwen2.5 tokenizer's.
    """
    path = resolve_checkpoint(Path(ckpt))
    check_complete(path)
    model = with_rope_scaling(read_model_config(path), rope_scaling)
    tokenizer_dir = _tokenizer_source(tokenizer, path)
    source = stored_dtype(path)
    dtype = dtype or source
    with staged_output(Path(out_dir)) as tmp, single_process_megatron(model):
        layout = MegatronLayout(model, source)
        check_compatible(layout, path, f"{path}/run_config.yaml")
        _write_weights(layout, path, tmp, dtype, shard_size, progress)
        (tmp / "config.json").write_text(json.dumps(hf_config_from_model(model, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation_config(model), indent=2) + "\n")
        if tokenizer_dir is None:
            write_qwen2_5_tokenizer(tmp)
        else:
            copy_tokenizer(tokenizer_dir, tmp)
    return model
