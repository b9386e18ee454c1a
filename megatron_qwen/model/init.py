"""Layout-independent weight initialization.

Each parameter's full (unsharded) value is drawn from a generator seeded by
``(seed, global parameter name)``; each rank then keeps its tensor-parallel shard. The
same seed therefore gives bit-identical weights at TP1, TP2, PP2, VPP2, EP2 or any
combination, which is what makes the layout-equivalence tests meaningful, and it is the
default behaviour rather than a test-only path.

What a parameter starts as (one, zero, random, scaled random) follows from its role, i.e. the
type of the module that owns it (:func:`param_role`), so the local and the Transformer Engine
specs, whose parameter names differ, start from the same model.
"""

from __future__ import annotations

import enum
import hashlib
import math
import re
from typing import Iterator, Tuple

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


class Role(enum.Enum):
    """What a parameter is for, which decides its initial value."""

    NORM = "norm"  # scale of a norm: ones
    BIAS = "bias"  # zeros (Qwen's QKV bias, a norm's shift)
    WEIGHT = "weight"  # N(0, std)
    RESIDUAL_OUT = "residual_out"  # N(0, std / sqrt(2L)): projections back into the residual stream


# Roles by the class that owns the parameter. Class *names* (anywhere in the owner's MRO),
# because Transformer Engine's classes exist only where TE imports, and a TE-spec model
# must be classified the same way as the local one. NOTE: never by parameter-name suffix:
# TE's fused norm+linear modules call their norm scale ``layer_norm_weight``.
_NORMS = {"RMSNorm", "LayerNorm", "FusedLayerNorm", "WrappedTorchNorm"}  # ours, torch, TE, apex
_FUSED_NORM_LINEAR = {"LayerNormLinear", "LayerNormMLP", "TELayerNormColumnParallelLinear"}  # TE
_RESIDUAL_OUT = {"RowParallelLinear", "TERowParallelLinear", "TERowParallelGroupedLinear"}


def _owned_by(module: torch.nn.Module, names: set) -> bool:
    return any(cls.__name__ in names for cls in type(module).__mro__)


def param_role(owner: torch.nn.Module, attr: str, ndim: int) -> Role:
    """The role of parameter ``attr`` (a direct attribute of ``owner``) with ``ndim`` dims.

    Raises:
        ValueError: a 1-D parameter of an unknown kind (rather than silently zeroing it).
    """
    if _owned_by(owner, _NORMS):
        return Role.NORM if attr == "weight" else Role.BIAS
    if _owned_by(owner, _FUSED_NORM_LINEAR) and attr.startswith("layer_norm_"):
        return Role.NORM if attr == "layer_norm_weight" else Role.BIAS
    if attr.startswith("bias"):
        return Role.BIAS
    if ndim == 1:
        raise ValueError(f"no initialization rule for the 1-D parameter {attr!r} of {type(owner).__name__}; "
                         "add its owner class to megatron_qwen/model/init.py")
    return Role.RESIDUAL_OUT if _owned_by(owner, _RESIDUAL_OUT) else Role.WEIGHT


def named_roles(chunk: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Parameter, Role]]:
    """(name, parameter, role) for every parameter of ``chunk`` (shared ones once)."""
    seen = set()
    for module_name, module in chunk.named_modules():
        for attr, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{attr}" if module_name else attr
            yield name, param, param_role(module, attr, param.dim())


def _full_value(name: str, role: Role, shape: torch.Size, model: ModelConfig, seed: int, device) -> torch.Tensor:
    if role is Role.NORM:
        return torch.ones(shape, device=device)
    if role is Role.BIAS:
        return torch.zeros(shape, device=device)
    std = model.init_method_std
    if role is Role.RESIDUAL_OUT:
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
    for name, param, role in named_roles(chunk):
        key = _global_name(name, chunk, model)
        full = _full_value(key, role, _full_shape(param), model, seed, param.device)
        param.copy_(_tp_shard(full, param, name, glu=True))


def check_norm_weights(chunk: torch.nn.Module) -> None:
    """Asserts the invariant every Qwen2.5 layer must start with: two norm scales (attention
    and MLP input), and the final norm on the last stage, all exactly one.

    Raises:
        RuntimeError: naming the layer whose norms are missing or not one.
    """
    for layer in chunk.decoder.layers:
        norms = [(name, p) for name, p, role in named_roles(layer) if role is Role.NORM]
        if len(norms) != 2 or not all(bool((p == 1).all()) for _, p in norms):
            raise RuntimeError(f"layer {layer.layer_number}: norm scales {[n for n, _ in norms]} must be two and "
                               "all ones after initialization")
    final = getattr(chunk.decoder, "final_layernorm", None)
    if final is not None and not bool((final.weight == 1).all()):
        raise RuntimeError("the final norm's scale must be all ones after initialization")
