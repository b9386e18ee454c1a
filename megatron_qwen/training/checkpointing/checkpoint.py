"""Distributed checkpoints (megatron ``dist_checkpointing``, torch_dist format).

Layout on disk::

    <run_dir>/checkpoints/iter_0000100/   model, optimizer, scheduler, RNG, counters
    <run_dir>/checkpoints/iter_0000100/run_config.yaml
    <run_dir>/checkpoints/iter_0000100/manifest.json   size and CRC32 of every file
    <run_dir>/checkpoints/latest_checkpointed_iteration.txt

Saving (:mod:`saver`) writes into ``iter_XXXXXXX.tmp`` and renames it only after every
rank finished writing and the manifest is written; resuming (:mod:`ckpt_dirs`) trusts a
directory only when its files match the manifest. This module builds the state dicts and
loads them.

Model and optimizer tensors are saved as ShardedTensors with global keys, so a
checkpoint saved at one TP/PP/VPP/DP layout loads at any other (the optimizer in
megatron's ``fully_reshardable`` format when the distributed optimizer is on).
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import torch
import yaml
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                            get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.training.checkpointing import torch_adam_fixes
from megatron_qwen.training.checkpointing.ckpt_dirs import CheckpointError

log = logging.getLogger(__name__)

CONFIG_FILE = "run_config.yaml"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


@dataclass
class TrainState:
    """Counters restored on resume, and the RNG state to apply before the next step."""

    iteration: int = 0
    consumed_samples: int = 0
    rng: Optional[dict] = None  # set by load() when the layout is unchanged

    def restore_rng(self) -> None:
        """Applies the loaded RNG state (once). Call right before the first step: anything
        that draws random numbers between loading and training (a DataLoader, a benchmark
        probe) would otherwise shift the stream and break bit-exact resume."""
        if self.rng is not None:
            _restore_rng(self.rng)
            self.rng = None


def _layout() -> dict:
    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size()}


def _rng_state() -> ShardedObject:
    # RNG states differ per (pp, tp) rank and are replicated across DP.
    state = {"cpu": torch.get_rng_state(),
             "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else None,
             "tracker": tensor_parallel.get_cuda_rng_tracker().get_states()}
    layout = _layout()
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"]),
                         (parallel_state.get_pipeline_model_parallel_rank(),
                          parallel_state.get_tensor_model_parallel_rank()),
                         replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True))


def _model_state(model: List[torch.nn.Module]) -> dict:
    # Sharded keys come from the unwrapped module; the DDP wrapper would add "module.".
    return {f"model{i}": _unwrap(chunk).sharded_state_dict() for i, chunk in enumerate(model)}


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """GPTModel inside DDP (and Float16Module for bf16/fp16)."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def _sharded_state(model, optimizer, scheduler, state: TrainState, loading: bool,
                   with_optimizer: bool, with_rng: bool) -> dict:
    model_sd = _model_state(model)
    sharded = {"model": model_sd, "iteration": state.iteration,
               "consumed_samples": state.consumed_samples, "layout": _layout()}
    if with_optimizer:
        sharded["optimizer_format"] = _optimizer_format(optimizer)
        if loading:
            _prepare_optimizer_for_loading(optimizer)
        # NOTE: the nested per-chunk dict, not a merged one: VPP chunks share local key names.
        sharded["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=loading, metadata=_OPTIM_METADATA)
        sharded["scheduler"] = scheduler.state_dict()
    if with_rng:
        sharded["rng_state"] = _rng_state()
    return sharded


def _optimizer_format(optimizer) -> str:
    """Kind and count of the megatron optimizers behind ``optimizer``, e.g. ``distributed x2``.

    The two kinds store different tensors (fp32 main params or not); the count changes when
    MoE expert parameters get their own optimizer (expert-parallel layouts), which changes
    the structure of the saved state. Neither can be resumed across.
    """
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    kind = "distributed" if any(isinstance(o, DistributedOptimizer) for o in inner) else "local"
    return f"{kind} x{len(inner)}"


def _prepare_optimizer_for_loading(optimizer) -> None:
    # The distributed optimizer can only describe its state once the state exists.
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        init = getattr(opt, "_init_optimizer_states_with_dummy_values", None)
        if init is not None:
            init()


@contextlib.contextmanager
def synced_params(model: List[torch.nn.Module]) -> Iterator[None]:
    """Model parameters fully gathered for the duration of the block.

    NOTE: with the distributed optimizer and ``overlap_param_gather``, megatron defers the
    parameter all-gather that follows ``optimizer.step()`` to the next forward pass (a
    forward pre-hook waits for it), so between steps each rank's weights are current only
    in its own 1/dp slice. Anything that reads the weights outside a forward pass (saving a
    checkpoint) must force the gather first, as Megatron-LM does before every save.
    """
    hooked = [chunk for chunk in model if getattr(chunk, "use_forward_hook", False)]
    for chunk in hooked:
        chunk.disable_forward_pre_hook(param_sync=True)
    try:
        yield
    finally:
        for chunk in hooked:
            chunk.enable_forward_pre_hook()


def save_strategy() -> FullyParallelSaveStrategyWrapper:
    """torch_dist writing spread over the data-parallel replicas: each DP rank writes a
    different part of the replicated shards instead of DP rank 0 writing them all (Megatron-LM's
    default); what makes a 1 TB (72B) checkpoint take minutes, not an hour."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _load_strategy(path: Path) -> FullyParallelLoadStrategyWrapper:
    """Each DP replica reads a part of the checkpoint and the parts are exchanged (broadcast)."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), group)


def state_to_save(model, optimizer, scheduler, state: TrainState) -> dict:
    """The sharded state dict of a full checkpoint (model, optimizer, schedule, RNG, counters)."""
    return _sharded_state(model, optimizer, scheduler, state, False, True, True)


def load(path: Path, model, optimizer, scheduler, with_optimizer: bool,
         model_cfg: Optional[ModelConfig] = None) -> TrainState:
    """Loads a checkpoint saved at any layout into this layout; returns the counters and, when
    resuming (``with_optimizer``) at the same layout, the RNG state (applied by
    :meth:`TrainState.restore_rng`).

    ``optimizer`` None loads the weights alone (tools); ``with_optimizer`` False loads the
    weights into a training run (fine-tuning: optimizer, counters and RNG start fresh).
    ``model_cfg``, when given, is compared with the checkpoint's
    ``run_config.yaml`` first, so a checkpoint of another model shape is named as such.
    Damaged files raise CheckpointError naming the file (check completeness first with
    :func:`manifest.verify` for a precise answer).
    """
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron distributed checkpoint (no metadata.json); "
                              "point checkpoint.load at an iter_XXXXXXX directory or a converted checkpoint")
    if model_cfg is not None:
        check_model_shape(path, model_cfg)
    common = _read(path, "common.pt", dist_checkpointing.load_common_state_dict, str(path))
    # A resumed run continues its RNG streams; a new run that loads weights (checkpoint.load) keeps
    # the ones train.seed gave it, as megatron's --finetune does.
    with_rng = with_optimizer and common.get("layout") == _layout()
    with_optimizer = with_optimizer and "optimizer" in common
    if with_optimizer and common.get("optimizer_format") != _optimizer_format(optimizer):
        raise CheckpointError(
            f"{path} holds optimizer state of kind '{common.get('optimizer_format')}' but this run has "
            f"'{_optimizer_format(optimizer)}'; resume with the same parallel.use_distributed_optimizer (and, "
            "for MoE, the same expert-parallel split), or load the weights alone with checkpoint.load=<dir> "
            "in a new run_dir")
    sharded = _sharded_state(model, optimizer, scheduler, TrainState(), True, with_optimizer, with_rng)
    loaded = _load_for_model(sharded, path)
    _set_weights(model, loaded["model"], path)
    if with_optimizer:
        torch_adam_fixes.install()
        optimizer.load_state_dict(loaded["optimizer"])
        torch_adam_fixes.unshare_step_tensors(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    elif optimizer is not None:
        # NOTE: mixed-precision optimizers hold fp32 main copies made from the weights at
        # construction and copy them back into the model after every step; without this
        # refresh a weights-only load (fine-tuning) reverts to the initial weights at step 2.
        optimizer.reload_model_params()
    rng = loaded.get("rng_state") if with_rng else None
    log.info("loaded %s (optimizer: %s, rng: %s)", path, with_optimizer, rng is not None)
    return TrainState(int(loaded.get("iteration", 0)), int(loaded.get("consumed_samples", 0)), rng)


def _read(path: Path, what: str, fn: Callable, *args):
    """``fn(*args)`` with any failure to read ``path`` turned into a one-line CheckpointError."""
    try:
        return fn(*args)
    except CheckpointError:
        raise
    except Exception as err:  # noqa: BLE001 - torch's unpickler and megatron raise many types
        raise _damaged(path, what, err) from err


def _damaged(path: Path, what: str, err: BaseException) -> CheckpointError:
    first = (str(err).strip().splitlines() or [""])[0][:300]
    return CheckpointError(
        f"{path}: reading {what} failed ({type(err).__name__}: {first}); the checkpoint is damaged or "
        "of another model: resume from an older complete iter_XXXXXXX, or point checkpoint.load at a "
        "checkpoint of this model")


# Fields of ModelConfig that decide the shape of some saved tensor.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "num_query_groups",
                 "kv_channels", "vocab_size", "tie_word_embeddings", "num_experts", "moe_ffn_hidden_size",
                 "moe_shared_expert_ffn_hidden_size", "moe_shared_expert_gate", "moe_layer_freq")


def check_model_shape(path: Path, model_cfg: ModelConfig) -> None:
    """Raises CheckpointError when ``path/run_config.yaml`` describes another model shape."""
    config = path / CONFIG_FILE
    if not config.is_file():
        return  # nothing to compare with; loading reports a mismatch by tensor
    try:
        saved = (yaml.safe_load(config.read_text()) or {}).get("model") or {}
    except yaml.YAMLError as err:
        raise CheckpointError(f"{config} is unreadable ({err}); the checkpoint is damaged") from err
    diff = [f"{k}={saved[k]} (this run: {getattr(model_cfg, k)})" for k in _SHAPE_FIELDS
            if k in saved and saved[k] != getattr(model_cfg, k)]
    if diff:
        raise CheckpointError(f"{path} was saved for another model shape: {', '.join(diff)}; choose the "
                              f"matching model (model=... or model.<field>=...) or another checkpoint")


def load_model_state(module: torch.nn.Module, state: dict, path: Path) -> None:
    """``load_state_dict`` that is strict except for ``*._extra_state`` keys.

    Transformer Engine modules keep FP8 metadata in ``_extra_state``, which their torch
    state dict expects but ``TEDotProductAttention`` leaves out of the sharded state dict;
    only those keys may be missing or unexpected, anything else is a checkpoint of another
    model.
    """
    missing, unexpected = module.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("_extra_state")]
    unexpected = [k for k in unexpected if not k.endswith("_extra_state")]
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match this model (missing: {_few(missing)}; unexpected: {_few(unexpected)}); "
            "load a checkpoint of the same model shape (model=...)")


def _few(keys: List[str], limit: int = 3) -> str:
    shown = ", ".join(keys[:limit]) or "none"
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_weights(path: Path, model, model_cfg: Optional[ModelConfig] = None) -> None:
    """Loads only the model weights of a checkpoint saved at any layout (no optimizer, RNG or
    counters), e.g. a frozen reference model's; ``model_cfg`` as in :func:`load`."""
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron distributed checkpoint (no metadata.json); "
                              "point it at an iter_XXXXXXX directory, a run's checkpoints/ or a converted checkpoint")
    if model_cfg is not None:
        check_model_shape(path, model_cfg)
    _set_weights(model, _load_for_model({"model": _model_state(model)}, path)["model"], path)


def _set_weights(model, weights: dict, path: Path) -> None:
    for i, chunk in enumerate(model):
        load_model_state(_unwrap(chunk), weights[f"model{i}"], path)


def _load_for_model(sharded: dict, path: Path) -> dict:
    """``dist_checkpointing.load`` with one-line errors: tensors of another model shape are named
    as such, any other failure (a truncated or corrupt shard) as damage (:func:`_read`)."""
    try:
        return dist_checkpointing.load(sharded, str(path), sharded_strategy=_load_strategy(path))
    except (CheckpointingException, CheckpointException) as err:  # NOTE: the latter is a BaseException
        failures = getattr(err, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else err
        if not isinstance(cause, CheckpointingException):  # not megatron's shape/key validation
            raise _damaged(path, "its shard files", cause) from None
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        first_line = first_line if len(first_line) <= 200 else first_line[:200] + " ..."  # e.g. a list of keys
        raise CheckpointError(f"{path} does not fit this model ({first_line}); load a pretrain or SFT checkpoint "
                              "of the same model (same model.* sizes), e.g. one converted with tools/convert.py "
                              "for this model") from None
    except Exception as err:  # noqa: BLE001 - torch's unpickler and megatron raise many types
        raise _damaged(path, "its shard files", err) from err


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
