"""Micro-batch slicing per data-parallel rank, resumption, and worker processes."""

import numpy as np
import torch

from megatron_qwen.data.batches import MicroBatchIterator, MicroBatchSampler


class Counting(torch.utils.data.Dataset):
    """Sample i is the array [i, i] (a stand-in for megatron's GPT samples)."""

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return {"tokens": np.array([i, i], dtype=np.int64)}


def _firsts(iterator, n):
    return [batch["tokens"][:, 0].tolist() for batch, _ in zip(iterator, range(n))]


def test_dp_ranks_split_each_micro_step_like_megatron():
    # Micro-batch 2, DP 2: micro-step k covers samples [4k, 4k+4); rank r takes [4k+2r, 4k+2r+2).
    assert list(MicroBatchSampler(12, 0, 2, 0, 2)) == [[0, 1], [4, 5], [8, 9]]
    assert list(MicroBatchSampler(12, 0, 2, 1, 2)) == [[2, 3], [6, 7], [10, 11]]
    assert len(MicroBatchSampler(12, 4, 2, 1, 2)) == 2


def test_union_over_dp_ranks_is_the_single_rank_order():
    single = sum(_firsts(MicroBatchIterator(Counting(), 0, 2, 0, 1), 8), [])
    r0, r1 = (_firsts(MicroBatchIterator(Counting(), 0, 2, r, 2), 4) for r in range(2))
    assert sum((a + b for a, b in zip(r0, r1)), []) == single


def test_resume_from_consumed_samples_continues_the_order():
    straight = _firsts(MicroBatchIterator(Counting(), 0, 4, 0, 1), 10)
    assert _firsts(MicroBatchIterator(Counting(), 16, 4, 0, 1), 6) == straight[4:]


def test_worker_processes_give_the_same_batches():
    assert _firsts(MicroBatchIterator(Counting(), 8, 2, 1, 2, num_workers=2), 8) == \
        _firsts(MicroBatchIterator(Counting(), 8, 2, 1, 2), 8)


def test_iteration_stops_at_the_end_of_the_dataset():
    assert len(_firsts(MicroBatchIterator(Counting(), 36, 2, 0, 1), 10)) == 2
