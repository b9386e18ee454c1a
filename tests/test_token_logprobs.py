"""Per-token log-probs and entropy from vocab-parallel logits at TP2 equal the full-vocabulary values;
the output layer at completion positions only equals megatron's full-logits forward."""

from __future__ import annotations

import pytest
import torch

import dataclasses

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.convert.verify_worker import Layout, join_process_group, layout_config, spawn_ranks
from megatron_qwen.model.build import build_model
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training.stages.grpo import completion_logits, completion_logps
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


def _logps_and_grads(model, batch, selected: bool):
    """Completion log-probs, entropy and parameter gradients through the narrowed or the full output layer."""
    rows, mask, labels = batch["tokens"][0], batch["loss_mask"][0], batch["labels"][0]
    if selected:
        logits = completion_logits(model, batch)
    else:  # the path before: megatron's batch-first logits of every position, then the completion positions
        logits = model(rows, torch.arange(rows.shape[1]).expand_as(rows), None)[mask > 0]
    logps, entropy = completion_logps(logits, labels, mask)
    model.zero_grad()
    (logps * torch.linspace(-1, 2, logps.numel()).view_as(logps)).sum().backward()
    return logps.detach(), entropy, [p.grad.clone() for p in model.parameters()]


def _check_selected_rank(rank: int, port: int) -> None:
    join_process_group(rank, 2, port, threads=1)
    try:
        base = layout_config(ModelConfig(vocab_size=64, num_layers=2), Layout(tp=2), 2)
        init_model_parallel(base)
        gen = torch.Generator().manual_seed(0)  # the same rows on both ranks
        mask = (torch.rand(3, 8, generator=gen) < 0.4).float()  # [G, s]: completion positions, any pattern
        batch = {"tokens": torch.randint(64, (1, 3, 8), generator=gen), "labels": torch.randint(64, (1, 3, 8),
                 generator=gen), "loss_mask": mask[None]}
        for sp in (False, True):
            cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, sp=sp))
            model = build_model(cfg.model, to_transformer_config(cfg), seed=5)[0]
            full = _logps_and_grads(model, batch, selected=False)
            ours = _logps_and_grads(model, batch, selected=True)
            assert model.output_layer.sequence_parallel == sp  # restored after the narrowed forward
            assert (full[0] != 0).sum() == mask.sum()
            torch.testing.assert_close(ours[0], full[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(ours[1], full[1], atol=1e-6, rtol=0)
            for got, want in zip(ours[2], full[2]):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    finally:
        destroy()


@pytest.mark.distributed
def test_output_layer_at_completion_positions_equals_the_full_logits_at_tp2_with_and_without_sp():
    spawn_ranks(_check_selected_rank, free_port(), 2, "selected logits check")
