"""Per-token log-probs and entropy from vocab-parallel logits at TP2 equal the full-vocabulary values;
GRPO's packed rows through the output layer at completion positions only equal megatron's
full-logits forward of padded rows (log-probs, entropy, gradients); sampling on a sequence-parallel
model equals sampling without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core import parallel_state

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.convert.verify_worker import Layout, join_process_group, layout_config, spawn_ranks
from megatron_qwen.generation.batch import packed_rows, rollout_batch
from megatron_qwen.generation.engine import Rollouts, SamplingParams
from megatron_qwen.generation.sampler import MegatronSampler
from megatron_qwen.model.build import build_model
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training.stages.grpo.stage import as_sequences, completion_logits, completion_logps
from megatron_qwen.training.stages.logprobs import token_entropy, token_logprobs
from megatron_qwen.training.step import pack_micro_batch
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


def _rollout_rows():
    """Three rollouts (prompt + completion) as padded rows [3, 8] and as one packed row [1, 20]."""
    gen = torch.Generator().manual_seed(0)  # the same rows on both ranks
    ids = lambda n: torch.randint(64, (n,), generator=gen).tolist()  # noqa: E731
    rollouts = Rollouts([ids(3), ids(5), ids(2)], [ids(6), ids(4), ids(5)], [True, False, True])
    padded, (packed, params) = rollout_batch(rollouts, 8), pack_micro_batch(packed_rows(rollouts, [0, 1, 2], 8))
    return padded, packed, params


def _logps_and_grads(model, batch, params=None):
    """Completion log-probs [3, s_max], entropy and parameter gradients: through megatron's full
    logits of padded rows (``params`` None, the path before), or the narrowed output layer on the packed row."""
    if params is None:
        rows = batch["tokens"]
        logits = model(rows, batch["position_ids"], None)[batch["loss_mask"] > 0]
        logps, entropy = completion_logps(logits, batch["labels"], batch["loss_mask"])
    else:
        logps, entropy = completion_logps(completion_logits(model, batch, params), batch["labels"], batch["loss_mask"])
        logps, entropy = (as_sequences(x, batch["cu_seqlens"]) for x in (logps, entropy))
    logps, entropy = logps[:, :8], entropy[:, :8]
    model.zero_grad()
    (logps * torch.linspace(-1, 2, logps.numel()).view_as(logps)).sum().backward()
    return logps.detach(), entropy, [_full_grad(p) for p in model.parameters()]


def _full_grad(param: torch.nn.Parameter) -> torch.Tensor:
    """The gradient as the optimizer sees it: under SP a norm weight's is summed over the TP ranks'
    positions (finalize_model_grads does this in training), which the padded and packed rows split differently."""
    grad = param.grad.clone()
    if getattr(param, "sequence_parallel", False):
        torch.distributed.all_reduce(grad, group=parallel_state.get_tensor_model_parallel_group())
    return grad


def _check_selected_rank(rank: int, port: int) -> None:
    join_process_group(rank, 2, port, threads=1)
    try:
        base = layout_config(ModelConfig(vocab_size=64, num_layers=2), Layout(tp=2), 2)
        init_model_parallel(base)
        padded, packed, params = _rollout_rows()
        samples = {}
        for sp in (False, True):
            cfg = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, sp=sp))
            model = build_model(cfg.model, to_transformer_config(cfg), seed=5)[0]
            full = _logps_and_grads(model, padded)
            ours = _logps_and_grads(model, packed, params)
            assert model.output_layer.sequence_parallel == sp  # restored after the narrowed forward
            assert (full[0] != 0).sum() == padded["loss_mask"].sum() == 15
            torch.testing.assert_close(ours[0], full[0], atol=1e-6, rtol=0)
            torch.testing.assert_close(ours[1], full[1], atol=1e-6, rtol=0)
            for got, want in zip(ours[2], full[2]):
                torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
            # Rollouts switch SP off while they decode (one token per step) and back on afterwards.
            samples[sp] = MegatronSampler(model).generate(padded["tokens"].tolist(), SamplingParams(
                max_new_tokens=6, temperature=1.0, seed=3, stop_token_ids=())).completion_ids
            assert model.config.sequence_parallel == model.embedding.word_embeddings.reduce_scatter_embeddings == sp
            assert model.decoder.layers[0].mlp.linear_fc2.sequence_parallel == sp
        assert samples[True] == samples[False]
    finally:
        destroy()


@pytest.mark.distributed
def test_packed_rows_and_output_layer_at_completions_equal_padded_full_logits_at_tp2_with_and_without_sp():
    spawn_ranks(_check_selected_rank, free_port(), 2, "selected logits check")
