"""Distributed checkpoints (megatron ``dist_checkpointing``, torch_dist format).

Layout on disk::

    <run_dir>/checkpoints/iter_0000100/   model, optimizer, scheduler, RNG, counters
    <run_dir>/checkpoints/iter_0000100/run_config.yaml
    <run_dir>/checkpoints/latest_checkpointed_iteration.txt

A checkpoint is written into ``iter_XXXXXXX.tmp`` and renamed only after every rank
finished writing; the ``latest`` file is replaced atomically afterwards. A crash at any
point therefore never exposes a partial checkpoint as the latest one.

Model and optimizer tensors are saved as ShardedTensors with global keys, so a
checkpoint saved at one TP/PP/VPP/DP layout loads at any other (the optimizer in
megatron's ``fully_reshardable`` format when the distributed optimizer is on).
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from torch.distributed.checkpoint.api import CheckpointException

from megatron_qwen.errors import UserError
from megatron_qwen.training import torch_adam_fixes

log = logging.getLogger(__name__)

LATEST_FILE = "latest_checkpointed_iteration.txt"
CONFIG_FILE = "run_config.yaml"
_OPTIM_METADATA = {"distrib_optim_sharding_type": "fully_reshardable"}


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the path and the fix."""


@dataclass
class TrainState:
    """Counters restored on resume."""

    iteration: int = 0
    consumed_samples: int = 0


def iteration_dir(root: Path, iteration: int) -> Path:
    return root / f"iter_{iteration:07d}"


def find_latest(root: Path) -> Optional[Path]:
    """The latest complete checkpoint under ``root`` or None."""
    marker = root / LATEST_FILE
    if not marker.is_file():
        return None
    path = iteration_dir(root, int(marker.read_text().strip()))
    return path if path.is_dir() else None


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


def save(root: Path, model, optimizer, scheduler, state: TrainState, config_yaml: str, keep_last: int) -> Path:
    """Saves a complete checkpoint collectively; returns its final directory."""
    final = iteration_dir(root, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, state, False, True, True), str(tmp))
    torch.distributed.barrier()
    if rank0:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = root / (LATEST_FILE + ".tmp")
        marker_tmp.write_text(str(state.iteration))
        os.replace(marker_tmp, root / LATEST_FILE)
        _prune(root, keep_last)
    torch.distributed.barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and not p.name.endswith(".tmp"))
    for old in done[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def load(path: Path, model, optimizer, scheduler, with_optimizer: bool) -> TrainState:
    """Loads a checkpoint saved at any layout into this layout; returns the counters."""
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron distributed checkpoint (no metadata.json); "
                              "point checkpoint.load at an iter_XXXXXXX directory or a converted checkpoint")
    common = dist_checkpointing.load_common_state_dict(str(path))
    with_optimizer = with_optimizer and "optimizer" in common
    if with_optimizer and common.get("optimizer_format") != _optimizer_format(optimizer):
        raise CheckpointError(
            f"{path} holds optimizer state of kind '{common.get('optimizer_format')}' but this run has "
            f"'{_optimizer_format(optimizer)}'; resume with the same parallel.use_distributed_optimizer (and, "
            "for MoE, the same expert-parallel split), or load the weights alone with checkpoint.load=<dir> "
            "in a new run_dir")
    same_layout = common.get("layout") == _layout()
    sharded = _sharded_state(model, optimizer, scheduler, TrainState(), True, with_optimizer, same_layout)
    loaded = _load_for_model(sharded, path)
    _set_weights(model, loaded["model"])
    if with_optimizer:
        torch_adam_fixes.install()
        optimizer.load_state_dict(loaded["optimizer"])
        torch_adam_fixes.unshare_step_tensors(optimizer)
        scheduler.load_state_dict(loaded["scheduler"])
    if same_layout and "rng_state" in loaded:
        _restore_rng(loaded["rng_state"])
    log.info("loaded %s (optimizer: %s, rng: %s)", path, with_optimizer, same_layout)
    return TrainState(int(loaded.get("iteration", 0)), int(loaded.get("consumed_samples", 0)))


def load_weights(path: Path, model) -> None:
    """Loads only the model weights of a checkpoint saved at any layout (no optimizer, RNG or
    counters), e.g. a frozen reference model's."""
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron distributed checkpoint (no metadata.json); "
                              "point it at an iter_XXXXXXX directory, a run's checkpoints/ or a converted checkpoint")
    _set_weights(model, _load_for_model({"model": _model_state(model)}, path)["model"])


def _set_weights(model, weights: dict) -> None:
    for i, chunk in enumerate(model):
        _unwrap(chunk).load_state_dict(weights[f"model{i}"], strict=True)


def _load_for_model(sharded: dict, path: Path) -> dict:
    """``dist_checkpointing.load``; a checkpoint of another model is a one-line CheckpointError."""
    try:
        return dist_checkpointing.load(sharded, str(path))
    except (CheckpointingException, CheckpointException) as err:  # NOTE: the latter is a BaseException
        failures = getattr(err, "failures", None)
        cause = next(iter(failures.values()))[0] if failures else err
        first_line = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        first_line = first_line if len(first_line) <= 200 else first_line[:200] + " ..."  # e.g. a list of keys
        raise CheckpointError(f"{path} does not fit this model ({first_line}); load a pretrain or SFT checkpoint "
                              "of the same model (same model.* sizes), e.g. one converted with tools/convert.py "
                              "for this model") from None


def _restore_rng(state: dict) -> None:
    torch.set_rng_state(state["cpu"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
