"""Per-token log-probs and entropy from vocab-parallel logits at TP2 equal the full-vocabulary values."""

from __future__ import annotations

import pytest
import torch

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.convert.verify_worker import Layout, join_process_group, layout_config, spawn_ranks
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training.token_logprobs import token_entropy, token_logprobs
from tests.helpers import free_port

VOCAB = 16


def _check_rank(rank: int, port: int) -> None:
    join_process_group(rank, 2, port, threads=1)
    try:
        init_model_parallel(layout_config(ModelConfig(vocab_size=VOCAB), Layout(tp=2), 2))
        gen = torch.Generator().manual_seed(0)  # the same full logits on both ranks
        logits = torch.randn(3, 5, VOCAB, generator=gen, dtype=torch.float64) * 4
        targets = torch.randint(VOCAB, (3, 5), generator=gen)
        shard = logits[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2].clone().requires_grad_()
        full = logits.clone().requires_grad_()
        reference = torch.log_softmax(full, -1).gather(-1, targets[..., None]).squeeze(-1)
        ours = token_logprobs(shard, targets)
        torch.testing.assert_close(ours, reference.float(), atol=1e-6, rtol=0)
        ours.sum().backward()
        reference.sum().backward()
        torch.testing.assert_close(shard.grad, full.grad[..., rank * VOCAB // 2:(rank + 1) * VOCAB // 2],
                                   atol=1e-6, rtol=0)
        probs = torch.softmax(logits, -1)
        entropy = -(probs * torch.log(probs)).sum(-1)
        torch.testing.assert_close(token_entropy(shard.detach()), entropy.float(), atol=1e-5, rtol=0)
    finally:
        destroy()


@pytest.mark.distributed
def test_logprobs_and_entropy_at_tp2_equal_full_vocabulary():
    spawn_ranks(_check_rank, free_port(), 2, "token_logprobs check")
