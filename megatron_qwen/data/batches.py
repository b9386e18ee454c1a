"""Micro-batch iteration over a map-style dataset, resumable by consumed samples.

Sample order is the dataset's own (megatron's GPT/blended datasets are already
shuffled by seed). Global batch ``g`` covers samples ``[g*G, (g+1)*G)``; within it,
data-parallel rank ``r`` takes micro-batch slices the way Megatron-LM's pretraining
sampler does, so every DP size sees the same global batch.
"""

from __future__ import annotations

from typing import Dict, Iterator, List

import numpy as np
import torch


def collate(samples: List[Dict[str, object]]) -> Dict[str, torch.Tensor]:
    """Stacks per-sample tensors/arrays into [b, ...] tensors."""
    out = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            out[key] = torch.stack(values)
        elif isinstance(values[0], np.ndarray):
            out[key] = torch.from_numpy(np.stack(values))
    return out


class MicroBatchIterator:
    """Yields this DP rank's micro-batches, starting at ``consumed_samples``."""

    def __init__(self, dataset, consumed_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int) -> None:
        self.dataset = dataset
        self.next_sample = consumed_samples  # first sample of the next DP-wide micro-step
        self.micro_batch_size = micro_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size

    def __iter__(self) -> Iterator[Dict[str, torch.Tensor]]:
        return self

    def __next__(self) -> Dict[str, torch.Tensor]:
        start = self.next_sample + self.dp_rank * self.micro_batch_size
        self.next_sample += self.micro_batch_size * self.dp_size
        if start + self.micro_batch_size > len(self.dataset):
            raise StopIteration
        return collate([self.dataset[i] for i in range(start, start + self.micro_batch_size)])
