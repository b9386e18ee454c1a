"""What a Megatron checkpoint of a given model holds, learned from megatron itself.

A TP1/PP1 GPTModel of our (local) spec is built on the meta device (no weight memory, even at
72B) and asked for its ``sharded_state_dict``: that gives every checkpoint key, global
shape and chunk exactly as the trainer saves and loads them (stacked layer axis, the
fused-norm key names, the SwiGLU split into two chunks). The converters only add the
values; nothing about the checkpoint format is restated here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Dict, Iterator, List, Tuple, Union

import torch
from megatron.core.dist_checkpointing.mapping import (
    ShardedObject,
    ShardedTensor,
    ShardedTensorFactory,
    apply_factories,
)
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.convert.mapping import build_rules, to_hf
from megatron_qwen.model.spec import build_block_spec
from megatron_qwen.platform.launch import detect_process_env, init_process_group
from megatron_qwen.platform.parallel import destroy, init_model_parallel

_PRECISION = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
Entry = Union[ShardedTensor, ShardedTensorFactory, ShardedObject]


@contextlib.contextmanager
def single_process_megatron(model: ModelConfig) -> Iterator[None]:
    """A one-process gloo group with megatron's parallel state at TP1/PP1."""
    if torch.distributed.is_initialized():
        raise RuntimeError("the converters run in a process of their own, not inside a distributed job")
    init_process_group(detect_process_env(environ={}), backend="gloo")
    try:
        init_model_parallel(Config(model=model))
        yield
    finally:
        destroy()


def _config(model: ModelConfig, dtype: torch.dtype) -> Config:
    cfg = Config(model=model)
    cfg.precision.dtype = _PRECISION[dtype]
    return cfg


def _local_chunk(model: ModelConfig, config: TransformerConfig) -> GPTModel:
    """The whole model as one GPTModel of the local spec, whatever is installed.

    NOTE: the mapping table names the local spec's parameters (Transformer Engine fuses the
    norms into the linear layers and names them differently), while both specs save the
    same checkpoint keys (see megatron_qwen.model.spec); arguments as in model.build.
    """
    return GPTModel(config=config, transformer_layer_spec=build_block_spec(config, te=False),
                    vocab_size=model.vocab_size, max_sequence_length=model.max_position_embeddings,
                    pre_process=True, post_process=True,
                    share_embeddings_and_output_weights=model.tie_word_embeddings,
                    position_embedding_type="rope", rotary_base=int(model.rope_theta))


class MegatronLayout:
    """The checkpoint layout of ``model`` stored in ``dtype``; needs :func:`single_process_megatron`."""

    def __init__(self, model: ModelConfig, dtype: torch.dtype) -> None:
        self.model, self.dtype = model, dtype
        # Sequential experts for the reason _local_chunk gives for the local spec.
        config = dataclasses.replace(to_transformer_config(_config(model, dtype)), perform_initialization=False,
                                     use_cpu_initialization=True, moe_grouped_gemm=False)
        with torch.device("meta"):
            self.chunk = _local_chunk(model, config)
        self.rules = build_rules(model)
        self.param_shapes = {name: p.shape for name, p in self.chunk.named_parameters()}
        table, params = {rule.mcore for rule in self.rules}, set(self.param_shapes)
        if table != params:
            raise RuntimeError(f"mapping table and model disagree: table only {sorted(table - params)}, "
                               f"model only {sorted(params - table)}")

    def hf_shapes(self) -> Dict[str, Tuple[int, ...]]:
        """HF tensor name -> shape in streaming order, derived from the parameter shapes by the table."""
        shapes = {}
        for rule in self.rules:
            meta = torch.empty(self.param_shapes[rule.mcore], device="meta")
            shapes.update({name: tuple(t.shape) for name, t in zip(rule.hf, to_hf(rule, meta, self.model))})
        return shapes

    def sharded_state_dict(self) -> Dict[str, Entry]:
        """Parameter name (and ``_extra_state`` names) -> its sharded entry, factories kept."""
        return self.chunk.sharded_state_dict()

    @functools.cached_property
    def chunks(self) -> Dict[str, List[ShardedTensor]]:
        """Parameter name -> the checkpoint chunks it is saved as (SwiGLU fc1: two)."""
        sharded = self.sharded_state_dict()
        apply_factories(sharded)
        out: Dict[str, List[ShardedTensor]] = {}
        for name, entry in sharded.items():
            tensors = entry if isinstance(entry, list) else [entry]
            if all(isinstance(t, ShardedTensor) for t in tensors):
                out[name] = tensors
        return out


def chunk_of(param: torch.Tensor, chunk: ShardedTensor) -> torch.Tensor:
    """The part of a full (TP1) parameter that ``chunk`` covers, shaped like the chunk's data.

    At TP1 a chunk's offsets past its prepended axes (layer, expert) are coordinates in
    the parameter itself.
    """
    n = chunk.prepend_axis_num
    region = tuple(slice(o, o + s) for o, s in zip(chunk.global_offset[n:], chunk.local_shape))
    return param[region].reshape((1,) * n + tuple(chunk.local_shape)).contiguous()
