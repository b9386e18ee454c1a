"""Micro-batch iteration over a map-style dataset, resumable by consumed samples.

Sample order is the dataset's own (megatron's GPT/blended datasets are already
shuffled by seed). Global batch ``g`` covers samples ``[g*G, (g+1)*G)``; within it,
data-parallel rank ``r`` takes micro-batch slices the way Megatron-LM's pretraining
sampler does, so every DP size sees the same global batch. Loading runs in a torch
``DataLoader`` (``data.num_workers`` background processes, pinned memory on GPU).
"""

from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader


def collate(samples: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Stacks per-sample tensors/arrays into [b, ...] tensors."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], (np.ndarray, np.integer)):  # np.integer: a blend's ``dataset_id``
            out[key] = torch.from_numpy(np.stack(values))
    return out


class MicroBatchSampler:
    """Index lists of this DP rank's micro-batches, from ``consumed_samples`` to the end."""

    def __init__(self, num_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int, dp_size: int, skipped: Optional[Callable[[int], bool]] = None) -> None:
        self.num_samples = num_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.skipped = skipped  # sample id -> whether its global batch is skipped (data.skips)

    def __iter__(self) -> Iterator[List[int]]:
        step = self.micro_batch_size * self.dp_size  # samples per DP-wide micro-step
        first = self.consumed_samples
        while first + step <= self.num_samples:
            if self.skipped is None or not self.skipped(first):
                start = first + self.dp_rank * self.micro_batch_size
                yield list(range(start, start + self.micro_batch_size))
            first += step

    def __len__(self) -> int:
        step = self.micro_batch_size * self.dp_size
        return max(0, (self.num_samples - self.consumed_samples) // step)


class MicroBatchIterator:
    """Yields this DP rank's micro-batches, starting at ``consumed_samples``."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, skipped: Optional[Callable[[int], bool]] = None) -> None:
        sampler = MicroBatchSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank, dp_size, skipped)
        # NOTE: a DataLoader draws its workers' base seed from the global generator when its
        # iterator is created, unless it has a generator of its own. The order is the
        # sampler's alone, so a fixed private generator changes nothing but keeps the training
        # RNG stream (dropout) identical between an uninterrupted and a resumed run.
        self._batches = iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate,
                                        num_workers=num_workers, pin_memory=torch.cuda.is_available(),
                                        persistent_workers=num_workers > 0,
                                        generator=torch.Generator().manual_seed(0)))

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        return next(self._batches)
