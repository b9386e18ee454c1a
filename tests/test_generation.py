"""Generation: token choice against transformers' warpers, and decoding of a converted model
against transformers' ``generate`` at TP1 and TP2 (KV cache and recomputation)."""

from __future__ import annotations

import types

import pytest
import torch
import transformers
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
from megatron_qwen.generation import GenerationError, Rollouts, SamplingParams
from megatron_qwen.generation.batch import rollout_batch
from megatron_qwen.generation.checkpoint import generate_from_checkpoint
from megatron_qwen.generation.sampler import check_layout, prompt_buffer
from megatron_qwen.generation.sampling import sample_next, top_p_mask
from tests.convert_support import make_hf_model

# Different lengths: the longer prompts' tails go through the decode steps; a repeated prompt is
# prefilled once and its KV cache copied (a GRPO group).
PROMPTS = [[5, 17, 42, 99, 3], [7, 8], [200, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10], [255, 0, 128], [7, 8]]
NEW_TOKENS = 32


@pytest.mark.parametrize("top_p", [0.3, 0.75, 0.95])  # 1.0: sample_next skips the mask
def test_top_p_keeps_what_transformers_keeps(top_p):
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0)) * 3
    warped = TopPLogitsWarper(top_p, min_tokens_to_keep=1)(None, logits.clone())
    assert torch.equal(top_p_mask(torch.softmax(logits, -1), top_p), warped > -float("inf"))


def test_sampled_frequencies_follow_transformers_distribution():
    # An evenly spaced grid of draws visits each token in proportion to its probability.
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(1)) * 2
    draws = 4000
    uniform = (torch.arange(draws, dtype=torch.float64) + 0.5) / draws
    tokens = torch.stack([sample_next(logits, 0.7, 0.9, u.expand(3)) for u in uniform])  # [draws, 3]
    counts = torch.stack([torch.bincount(tokens[:, row], minlength=40) for row in range(3)]) / draws
    reference = torch.softmax(TopPLogitsWarper(0.9)(None, TemperatureLogitsWarper(0.7)(None, logits.clone())), -1)
    assert (counts - reference).abs().max() <= 1.0 / draws + 1e-6
    assert torch.equal(sample_next(logits, 0.0, 0.5, uniform[:3].float()), logits.argmax(-1))


def test_prompts_share_one_buffer_from_position_zero():
    tokens, lengths = prompt_buffer([[1, 2, 3], [4]], pad_id=9, max_new_tokens=2)
    assert tokens.tolist() == [[1, 2, 3, 9, 9], [4, 9, 9, 9, 9]] and lengths.tolist() == [3, 1]


def test_rollouts_become_right_padded_rows_with_the_loss_on_completions():
    rollouts = Rollouts([[1, 2, 3], [6]], [[4, 5], [7, 8, 9]], [True, False])
    batch = rollout_batch(rollouts, seq_length=5, pad_id=0)
    assert batch["tokens"].tolist() == [[1, 2, 3, 4, 0], [6, 7, 8, 0, 0]]
    assert batch["labels"].tolist() == [[2, 3, 4, 5, 0], [7, 8, 9, 0, 0]]
    assert batch["loss_mask"].tolist() == [[0, 0, 1, 1, 0], [1, 1, 1, 0, 0]]  # where the label is a completion token
    assert batch["position_ids"].tolist() == [list(range(5))] * 2
    assert rollout_batch(rollouts)["tokens"].shape == (2, 4)
    with pytest.raises(GenerationError, match="5 tokens does not fit seq_length=3"):
        rollout_batch(rollouts, seq_length=3)


def test_bad_requests_are_refused(monkeypatch):
    for params, match in [(SamplingParams(max_new_tokens=0), "max_new_tokens=0"),
                          (SamplingParams(temperature=-1), "temperature=-1"),
                          (SamplingParams(top_p=0), "top_p=0")]:
        with pytest.raises(GenerationError, match=match):
            params.check()
    from megatron.core import parallel_state

    monkeypatch.setattr(parallel_state, "get_context_parallel_world_size", lambda: 2)
    with pytest.raises(GenerationError, match="cp=1 .* got cp=2"):
        check_layout(types.SimpleNamespace(config=types.SimpleNamespace(sequence_parallel=False)))


def _hf_greedy(hf_dir, prompts, stop=None):
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    out = []
    for prompt in prompts:  # one at a time: no padding on the reference side
        # NOTE: an explicit mask, or transformers masks prompt tokens equal to pad_token_id.
        ids = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=stop, pad_token_id=0)
        out.append(ids[0, len(prompt):].tolist())
    return out


@pytest.mark.distributed
def test_decoding_matches_transformers_at_tp1_and_tp2(tmp_path):
    hf = make_hf_model(tmp_path / "hf", layers=2, heads=6, kv=2, tied=True)
    hf_to_mcore(hf, tmp_path / "ckpt", progress=False)
    greedy = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=())
    sampled = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0.9, top_p=0.9, seed=7, stop_token_ids=())
    reference = _hf_greedy(hf, PROMPTS)
    stop = reference[0][5]  # a token the first prompt produces after a few steps
    stopping = SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, stop_token_ids=(stop,))
    requests = [greedy, SamplingParams(**{**greedy.__dict__, "use_kv_cache": False}), sampled,
                SamplingParams(**{**sampled.__dict__, "use_kv_cache": False}), stopping]
    results = {tp: generate_from_checkpoint(tmp_path / "ckpt", PROMPTS, requests, tp=tp) for tp in (1, 2)}
    for tp, (cached, recomputed, sample, sample_recomputed, stopped) in results.items():
        assert cached.completion_ids == reference, f"tp={tp}"
        assert recomputed.completion_ids == reference, f"tp={tp} without KV cache"
        assert sample.completion_ids == sample_recomputed.completion_ids, f"tp={tp}"
        assert stopped.completion_ids == [r[: r.index(stop) + 1] if stop in r else r for r in reference]
        assert stopped.stopped == [stop in r for r in reference] and stopped.stopped[0]
    assert results[1][2].completion_ids == results[2][2].completion_ids  # same seed, same samples at TP1/TP2
    assert results[1][2].completion_ids != reference  # sampling did sample
    assert _hf_greedy(hf, PROMPTS, stop=stop) == results[2][4].completion_ids  # transformers keeps the stop too
    # Rows that stop leave the batch: the others keep their random numbers (the same samples up to the stop).
    sample = results[1][2].completion_ids
    stop = sample[0][3]
    [early] = generate_from_checkpoint(tmp_path / "ckpt", PROMPTS, [SamplingParams(
        **{**sampled.__dict__, "stop_token_ids": (stop,)})], tp=1)
    assert early.completion_ids == [r[: r.index(stop) + 1] if stop in r else r for r in sample]
    assert len(early.completion_ids[0]) <= 4 < NEW_TOKENS - 8  # row 0 left the batch early
