"""Layout-independent weight initialization.

Each parameter's full (unsharded) value is drawn from a generator seeded by
``(seed, global parameter name)``; each rank then keeps its tensor-parallel shard. The
same seed therefore gives bit-identical weights at TP1, TP2, PP2, VPP2, EP2 or any
combination, which is what makes the layout-equivalence tests meaningful, and it is the
default behaviour rather than a test-only path.
"""

from __future__ import annotations

import hashlib
import math
import re

import torch
from megatron.core import parallel_state

from megatron_qwen.config.schema import ModelConfig

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.")
_LOCAL_EXPERT = re.compile(r"local_experts\.(\d+)\.")
_GROUPED_EXPERT = re.compile(r"experts\.(linear_fc[12])\.weight(\d+)$")


def _global_name(name: str, chunk: torch.nn.Module, model: ModelConfig) -> str:
    """Maps a chunk-local parameter name to its layout-independent global name."""
    if name == "output_layer.weight" and model.tie_word_embeddings:
        return "embedding.word_embeddings.weight"
    match = _LAYER.match(name)
    if match:
        layer = chunk.decoder.layers[int(match.group(1))]
        name = f"decoder.layers.{layer.layer_number - 1}." + name[match.end():]
    expert = _LOCAL_EXPERT.search(name)
    if expert:
        index = _expert_offset(model) + int(expert.group(1))
        name = name[: expert.start()] + f"local_experts.{index}." + name[expert.end():]
    grouped = _GROUPED_EXPERT.search(name)
    if grouped:
        # TE's grouped GEMM holds local expert i as experts.linear_fc1.weight{i}; it gets the
        # value SequentialMLP's experts.local_experts.{i}.linear_fc1.weight would get.
        fc, index = grouped.group(1), _expert_offset(model) + int(grouped.group(2))
        name = name[: grouped.start()] + f"experts.local_experts.{index}.{fc}.weight"
    return name


def _expert_offset(model: ModelConfig) -> int:
    """Global index of this EP rank's first local expert."""
    return parallel_state.get_expert_model_parallel_rank() * _num_local_experts(model)


def _num_local_experts(model: ModelConfig) -> int:
    return model.num_experts // parallel_state.get_expert_model_parallel_world_size()


def _tp_rank_and_size(param: torch.nn.Parameter) -> tuple[int, int]:
    if not getattr(param, "allreduce", True):  # expert parameter: expert-tensor-parallel
        return (parallel_state.get_expert_tensor_parallel_rank(),
                parallel_state.get_expert_tensor_parallel_world_size())
    return (parallel_state.get_tensor_model_parallel_rank(),
            parallel_state.get_tensor_model_parallel_world_size())


def _seed_for(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _full_value(name: str, shape: torch.Size, model: ModelConfig, seed: int, device) -> torch.Tensor:
    if len(shape) == 1:
        # Norm weights start at one, biases (Qwen's QKV bias) at zero.
        return torch.ones(shape, device=device) if name.endswith("norm.weight") else torch.zeros(shape, device=device)
    std = model.init_method_std
    if "linear_proj" in name or "linear_fc2" in name:
        std /= math.sqrt(2.0 * model.num_layers)  # scaled init of residual-branch outputs
    gen = torch.Generator(device=device).manual_seed(_seed_for(seed, name))
    return torch.randn(shape, generator=gen, device=device) * std


def _tp_shard(full: torch.Tensor, param: torch.nn.Parameter, name: str, glu: bool) -> torch.Tensor:
    if not getattr(param, "tensor_model_parallel", False):
        return full
    rank, size = _tp_rank_and_size(param)
    dim = param.partition_dim
    if glu and "linear_fc1" in name:
        # SwiGLU fc1 is [gate; up] at TP1 and [gate_r; up_r] on TP rank r.
        halves = full.chunk(2, dim=dim)
        return torch.cat([h.chunk(size, dim=dim)[rank] for h in halves], dim=dim)
    return full.chunk(size, dim=dim)[rank]


def _full_shape(param: torch.nn.Parameter) -> torch.Size:
    shape = list(param.shape)
    if getattr(param, "tensor_model_parallel", False):
        shape[param.partition_dim] *= _tp_rank_and_size(param)[1]
    return torch.Size(shape)


@torch.no_grad()
def init_weights(chunk: torch.nn.Module, model: ModelConfig, seed: int) -> None:
    """Overwrites every parameter of ``chunk`` with its seed-determined value."""
    for name, param in chunk.named_parameters():
        key = _global_name(name, chunk, model)
        full = _full_value(key, _full_shape(param), model, seed, param.device)
        param.copy_(_tp_shard(full, param, name, glu=True))
