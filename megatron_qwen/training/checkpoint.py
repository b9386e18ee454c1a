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

import atexit
import contextlib
import logging
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

import torch
from megatron.core import dist_checkpointing, parallel_state, tensor_parallel
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (get_default_load_sharded_strategy,
                                                             get_default_save_sharded_strategy)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (FullyParallelLoadStrategyWrapper,
                                                                        FullyParallelSaveStrategyWrapper)
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


def _save_strategy() -> FullyParallelSaveStrategyWrapper:
    """torch_dist writing spread over the data-parallel replicas: each DP rank writes a
    different part of the replicated shards instead of DP rank 0 writing them all (Megatron-LM's
    default); what makes a 1 TB (72B) checkpoint take minutes, not an hour."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy(), group)


def _load_strategy(path: Path) -> FullyParallelLoadStrategyWrapper:
    """Each DP replica reads a part of the checkpoint and the parts are exchanged (broadcast)."""
    group = parallel_state.get_data_parallel_group(with_context_parallel=True)
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(path)), group)


def save(root: Path, model, optimizer, scheduler, state: TrainState, config_yaml: str, keep_last: int) -> Path:
    """Saves a complete checkpoint collectively; returns its final directory."""
    with synced_params(model):
        return _save(root, model, optimizer, scheduler, state, config_yaml, keep_last)


def _save(root: Path, model, optimizer, scheduler, state: TrainState, config_yaml: str, keep_last: int) -> Path:
    final = iteration_dir(root, state.iteration)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = torch.distributed.get_rank() == 0
    if rank0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    torch.distributed.barrier()
    dist_checkpointing.save(_sharded_state(model, optimizer, scheduler, state, False, True, True), str(tmp),
                            sharded_strategy=_save_strategy())
    torch.distributed.barrier()
    if rank0:
        (tmp / CONFIG_FILE).write_text(config_yaml)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        marker_tmp = root / (LATEST_FILE + ".tmp")
        marker_tmp.write_text(str(state.iteration))
        os.replace(marker_tmp, root / LATEST_FILE)
    torch.distributed.barrier()
    if rank0:
        _prune(root, keep_last)
    return final


_pruner: Optional[threading.Thread] = None
PRUNE_EXIT_WAIT_S = 30  # at exit; well below srun --wait in slurm/train.sbatch


def _prune(root: Path, keep_last: int) -> None:
    """Deletes all but the newest ``keep_last`` checkpoints in a background thread on rank 0.

    Deleting a 1 TB checkpoint takes minutes on a parallel filesystem; no rank waits for it.
    The old directories are first renamed (atomic, instant) so that nothing mistakes them for
    checkpoints. At exit the process waits at most ``PRUNE_EXIT_WAIT_S`` for the deletion (a
    stop-signal exit must not be held up); whatever is left is removed by the next prune.
    """
    global _pruner
    if _pruner is None:
        atexit.register(lambda: _pruner.join(PRUNE_EXIT_WAIT_S))
    else:
        _pruner.join()  # the previous deletion, normally long done
    done = sorted(p for p in root.glob("iter_*") if p.is_dir() and "." not in p.name)
    doomed = list(root.glob("iter_*.deleting"))  # left behind by a job that was killed meanwhile
    for old in done[:-keep_last] if keep_last > 0 else []:
        doomed.append(old.with_name(old.name + ".deleting"))
        os.replace(old, doomed[-1])
    _pruner = threading.Thread(target=lambda: [shutil.rmtree(d, ignore_errors=True) for d in doomed],
                               name="checkpoint-prune", daemon=True)
    _pruner.start()


def load(path: Path, model, optimizer, scheduler, with_optimizer: bool) -> TrainState:
    """Loads a checkpoint saved at any layout into this layout; returns the counters and, for
    the same layout, the RNG state (applied by :meth:`TrainState.restore_rng`).

    ``optimizer`` None loads the weights alone (tools); ``with_optimizer`` False loads the
    weights into a training run (fine-tuning: optimizer and counters start fresh).
    """
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
    rng = loaded.get("rng_state") if same_layout else None
    log.info("loaded %s (optimizer: %s, rng: %s)", path, with_optimizer, rng is not None)
    return TrainState(int(loaded.get("iteration", 0)), int(loaded.get("consumed_samples", 0)), rng)


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


def load_weights(path: Path, model) -> None:
    """Loads only the model weights of a checkpoint saved at any layout (no optimizer, RNG or
    counters), e.g. a frozen reference model's."""
    if not (path / "metadata.json").is_file():
        raise CheckpointError(f"{path} is not a megatron distributed checkpoint (no metadata.json); "
                              "point it at an iter_XXXXXXX directory, a run's checkpoints/ or a converted checkpoint")
    _set_weights(model, _load_for_model({"model": _model_state(model)}, path)["model"], path)


def _set_weights(model, weights: dict, path: Path) -> None:
    for i, chunk in enumerate(model):
        load_model_state(_unwrap(chunk), weights[f"model{i}"], path)


def _load_for_model(sharded: dict, path: Path) -> dict:
    """``dist_checkpointing.load``; a checkpoint of another model is a one-line CheckpointError."""
    try:
        return dist_checkpointing.load(sharded, str(path), sharded_strategy=_load_strategy(path))
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
