"""The frozen reference policy of DPO (and GRPO's KL term): a model copy or precomputed log-probs.

The reference is the model at the start of the stage: the weights of ``stage.reference_load``,
else of ``checkpoint.load``, else the seed's initialization, always re-created from there
(never from the weights being trained, which on resume have moved on). Two ways to use it:

- :class:`ReferenceModel` keeps a frozen copy at the policy's TP/PP/VPP layout (parameters
  only: no gradients, no optimizer state) and runs it forward on every batch;
- :func:`precompute_reference` runs the reference over every pair once before training and
  stores the sequence log-probs in ``<run_dir>/reference/``; a resumed run reads them back.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import numpy as np
import torch
from megatron.core import parallel_state, tensor_parallel
from megatron.core.transformer.module import Float16Module

from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import rows_per_sample
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.data.batches import MicroBatchIterator
from megatron_qwen.model.build import build_model
from megatron_qwen.platform import collectives
from megatron_qwen.platform.parallel import adapt_to_backend
from megatron_qwen.training.checkpointing import checkpoint, ckpt_dirs
from megatron_qwen.training.stages.logprobs import SequenceLogpsPass, sequence_logps_pass

log = logging.getLogger(__name__)

REFERENCE_DIR = "reference"


def reference_checkpoint(cfg: Config) -> Optional[Path]:
    """Collective: where the reference weights come from, a complete checkpoint (None: the
    seed's initialization)."""
    source = cfg.stage.reference_load or cfg.checkpoint.load
    if not source:
        return None
    return ckpt_dirs.resolve_load(Path(source))


@contextlib.contextmanager
def _rng_unchanged() -> Iterator[None]:
    # Building a model draws from megatron's RNG tracker; the policy's RNG stream stays as it was.
    cpu, tracker = torch.get_rng_state(), tensor_parallel.get_cuda_rng_tracker().get_states()
    try:
        yield
    finally:
        torch.set_rng_state(cpu)
        tensor_parallel.get_cuda_rng_tracker().set_states(tracker)


class ReferenceModel:
    """A frozen copy of the stage's starting model, one chunk per pipeline (virtual) stage."""

    def __init__(self, cfg: Config) -> None:
        config = to_transformer_config(cfg)  # its own config: the policy's carries DDP/optimizer hooks
        adapt_to_backend(config)
        with _rng_unchanged():
            chunks = build_model(cfg.model, config, cfg.train.seed)
        if cfg.precision.dtype != "fp32":
            chunks = [Float16Module(config, chunk) for chunk in chunks]
        source = reference_checkpoint(cfg)
        if source is not None:
            checkpoint.load_weights(source, chunks, cfg.model)
        for chunk in chunks:
            chunk.eval()
            chunk.requires_grad_(False)
        self.chunks: List[torch.nn.Module] = chunks


class _Pairs(torch.utils.data.Dataset):
    """Every pair of a preference dataset once (then wrapping around to fill the last batch)."""

    def __init__(self, dataset, length: int) -> None:
        self.dataset, self.length = dataset, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, k: int):
        position = k % len(self.dataset.pairs)
        return {**self.dataset.pair_sample(position), "position": torch.tensor(position)}


def _compute(dataset, chunks: Sequence[torch.nn.Module], cfg: Config) -> Optional[np.ndarray]:
    """Reference log-probs [pairs, 2] of ``dataset`` on the last pipeline stage (None elsewhere)."""
    t = cfg.train
    dp, dp_rank = parallel_state.get_data_parallel_world_size(), parallel_state.get_data_parallel_rank()
    per_rank = t.global_batch_size // (t.micro_batch_size * dp)  # micro-batches of one global batch
    length = -(-len(dataset.pairs) // t.global_batch_size) * t.global_batch_size
    iterators = [MicroBatchIterator(_Pairs(dataset, length), 0, t.micro_batch_size, dp_rank, dp) for _ in chunks]
    logps_pass = SequenceLogpsPass(cfg, rows_per_sample(cfg.stage))
    found: List[torch.Tensor] = []
    for _ in range(length // t.global_batch_size):
        batches = [[next(it) for _ in range(per_rank)] for it in iterators]
        logps = sequence_logps_pass(logps_pass, list(chunks), batches, t.seq_length, t.micro_batch_size)
        if logps is not None:
            positions = [b["position"].to(lp.device, torch.float64)[:, None] for b, lp in zip(batches[-1], logps)]
            found += [torch.cat([p, lp.double()], dim=1) for p, lp in zip(positions, logps)]  # on the device
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return _gather_table(torch.cat(found), len(dataset.pairs))


def _gather_table(rows: torch.Tensor, pairs: int) -> np.ndarray:
    """[n, 3] (position, chosen, rejected) rows of every DP rank -> the [pairs, 2] table."""
    parts = collectives.all_gather(rows, group=parallel_state.get_data_parallel_group())
    table = np.full((pairs, 2), np.nan, dtype=np.float32)  # fp32 sums: stored exactly
    for part in (p.cpu() for p in parts):
        table[part[:, 0].long().numpy()] = part[:, 1:].numpy()
    assert not np.isnan(table).any(), "every pair is in some DP rank's share"
    return table


def _table_path(run_dir: Path, dataset) -> Path:
    return run_dir / REFERENCE_DIR / f"{dataset.index_split.name}-{dataset.unique_description_hash}.npy"


def _writes() -> bool:
    # One rank of the last pipeline stage writes the (DP-gathered, TP-replicated) table.
    return (parallel_state.is_pipeline_last_stage(ignore_virtual=True)
            and parallel_state.get_data_parallel_rank() == 0 and parallel_state.get_tensor_model_parallel_rank() == 0)


def _save(path: Path, table: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.tmp{os.getpid()}.npy")
    np.save(tmp, table)
    os.replace(tmp, path)  # a table is either complete or absent


def precompute_reference(datasets: Sequence, run_dir: Path, cfg: Config,
                         policy: Sequence[torch.nn.Module], policy_is_reference: bool) -> None:
    """Gives every preference dataset its reference log-probs (``set_reference``): read from
    ``<run_dir>/reference/`` when stored, else computed once and stored there.

    ``policy`` computes them when ``policy_is_reference`` (a fresh stage, no ``reference_load``);
    otherwise a :class:`ReferenceModel` is built for it and freed afterwards.
    """
    missing = [d for d in datasets if not _table_path(run_dir, d).is_file()]
    if missing:
        chunks = list(policy) if policy_is_reference else ReferenceModel(cfg).chunks
        for chunk in chunks:
            chunk.eval()
        for dataset in missing:
            start = time.perf_counter()
            table = _compute(dataset, chunks, cfg)
            if _writes():
                _save(_table_path(run_dir, dataset), table)
                log.info("reference log-probs of %d %s pairs in %.1f s -> %s", len(dataset.pairs),
                         dataset.index_split.name, time.perf_counter() - start, _table_path(run_dir, dataset))
        for chunk in policy:
            chunk.train()
    collectives.barrier()
    for dataset in datasets:
        dataset.set_reference(np.load(_table_path(run_dir, dataset)))
