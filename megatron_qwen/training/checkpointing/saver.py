"""Saving checkpoints, synchronously or in the background (``checkpoint.async_save``).

Both ways use megatron's asynchronous ``dist_checkpointing`` request: synchronously it is
executed at once; asynchronously megatron's :class:`AsyncCallsQueue` forks a writer from a
snapshot of the state and training goes on while it writes. Each rank's write step writes
its shard files and then checksums them (:func:`manifest.record_checksums`), so with async
save the checksums of a 1 TB checkpoint are read in the forked writers, never while the
loop waits. Either way the checkpoint is published by a finalize step that runs on every
rank once every rank's write step has finished: ``run_config.yaml``, the manifest (the
writers' checksums, plus those of the few small files written outside them), the rename of
``iter_XXXXXXX.tmp`` and the ``latest`` marker. Rank 0 then prunes old checkpoints in a
background thread, holding no rank at a barrier.

Crash consistency: a directory is renamed to ``iter_XXXXXXX`` (and named by ``latest``)
only by the finalize step, after its manifest is written, and the finalize step runs only
after every rank's writer finished writing and checksumming; a crash at any earlier moment
leaves ``iter_XXXXXXX.tmp``, which resuming ignores and pruning removes. The checksums are
of the bytes read back after megatron's writer closed (and fsynced) each file, which
nothing writes afterwards; a record that a crash cut short, or whose size no longer matches
its file, is not trusted: those files are checksummed again at publish.

Synchronous save keeps the loop waiting for the write by definition, and so for the
checksums too (per rank, its own files in parallel, read back from the page cache).
"""

from __future__ import annotations

import logging
import shutil
import time
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from functools import partial
from pathlib import Path
from typing import Callable, Optional

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue, AsyncRequest, _disable_gc

from megatron_qwen.platform import collectives, orphans
from megatron_qwen.training.checkpointing import ckpt_dirs, manifest
from megatron_qwen.training.checkpointing.checkpoint import (CONFIG_FILE, TrainState, save_strategy, state_to_save,
                                                             synced_params)

log = logging.getLogger(__name__)

_writer_manager = []  # keeps the manager alive: it shuts down when garbage-collected
PRUNE_EXIT_WAIT_S = 30  # at the end of training; well below srun --wait in slurm/train.sbatch


def _use_orphan_safe_writer_queue() -> None:
    """Gives megatron's writer a results queue whose manager process dies with the trainer.

    NOTE: megatron creates it lazily (``filesystem_async._get_write_results_queue``) in a
    spawn-context manager that outlives a killed trainer; setting the module's queue first
    makes it use ours.
    """
    if filesystem_async._results_queue is None:
        _writer_manager.append(orphans.spawned_manager())
        filesystem_async._results_queue = _writer_manager[-1].Queue()


def _checksumming(request: AsyncRequest) -> AsyncRequest:
    """``request`` whose write step also checksums the files it wrote."""
    if request.async_fn is None:  # nothing to write on this rank
        return request
    return request._replace(async_fn=partial(_write_then_checksum, request.async_fn))


@_disable_gc()  # NOTE: as megatron's writer: a forked child must not free the parent's CUDA tensors
def _write_then_checksum(write: Callable, rank: int, buckets: list, *args, **kwargs) -> None:
    # NOTE: megatron's write function takes (rank, write buckets, results queue); a bucket is
    # (file path, file name, data), one file each (AsyncRequest.execute_sync relies on the same order).
    write(rank, buckets, *args, **kwargs)
    paths = [Path(bucket[0]) for bucket in buckets]
    manifest.record_checksums(paths[0].parent, paths, rank)


class CheckpointSaver:
    """Writes and publishes the checkpoints of one run under ``root``."""

    def __init__(self, root: Path, keep_last: int, async_save: bool) -> None:
        self.root, self.keep_last = Path(root), keep_last
        self.queue: Optional[AsyncCallsQueue] = AsyncCallsQueue() if async_save else None
        self.rank0 = torch.distributed.get_rank() == 0
        self._pruner = ThreadPoolExecutor(max_workers=1) if self.rank0 else None
        self._pruning: Optional[Future] = None

    def save(self, model, optimizer, scheduler, state: TrainState, config_yaml: str) -> None:
        """Collective: starts (async) or completes (sync) the checkpoint of ``state.iteration``."""
        self.wait()  # one checkpoint in flight at a time
        _use_orphan_safe_writer_queue()
        start = time.perf_counter()
        tmp = self._fresh_tmp(state.iteration)
        with synced_params(model):
            request = _checksumming(dist_checkpointing.save(state_to_save(model, optimizer, scheduler, state),
                                                            str(tmp), sharded_strategy=save_strategy(),
                                                            async_sharded_save=True))
            request.add_finalize_fn(partial(self._publish, tmp, state.iteration, config_yaml))
            if self.queue is None:
                request.execute_sync()
            else:
                self.queue.schedule_async_request(request)
        log.info("checkpoint of iteration %d %s (%.2f s in the training loop)", state.iteration,
                 "saved" if self.queue is None else "started in the background", time.perf_counter() - start)

    def _fresh_tmp(self, iteration: int) -> Path:
        tmp = self.root / f"iter_{iteration:07d}.tmp"
        if self.rank0:
            shutil.rmtree(tmp, ignore_errors=True)  # left by a crash during an earlier attempt
            tmp.mkdir(parents=True)
        collectives.barrier()
        return tmp

    def _publish(self, tmp: Path, iteration: int, config_yaml: str) -> None:
        """Finalize step, on every rank after every rank's write finished."""
        start = time.perf_counter()
        if self.rank0:
            (tmp / CONFIG_FILE).write_text(config_yaml)
        manifest.write_manifest(tmp)
        if self.rank0:
            ckpt_dirs.publish(tmp, iteration)
        collectives.barrier()  # published on every rank's return: a rollback may load it
        log.info("checkpoint of iteration %d published (manifest and rename: %.2f s)", iteration,
                 time.perf_counter() - start)
        if self.rank0:
            self._wait_prune()
            self._pruning = self._pruner.submit(ckpt_dirs.prune, self.root, self.keep_last, iteration)

    def poll(self) -> None:
        """Collective: publishes background saves that have finished on every rank."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=False)

    def wait(self) -> None:
        """Collective: blocks until every pending save is published."""
        if self.queue is not None and self.queue.get_num_unfinalized_calls():
            self.queue.maybe_finalize_async_calls(blocking=True)

    def _wait_prune(self, timeout: Optional[float] = None) -> None:
        if self._pruning is not None:
            try:
                self._pruning.result(timeout)
            except FutureTimeout:
                log.warning("old checkpoints are still being deleted; the next prune finishes the job")
                return
            self._pruning = None

    def close(self) -> None:
        """Collective: waits for pending saves, and at most ``PRUNE_EXIT_WAIT_S`` for pruning
        (deleting a 1 TB checkpoint takes minutes; a stop-signal exit must not wait for it)."""
        self.wait()
        if self.rank0:
            self._wait_prune(PRUNE_EXIT_WAIT_S)
            self._pruner.shutdown(wait=False)
