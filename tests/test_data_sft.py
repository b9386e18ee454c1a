"""SFT: Qwen2.5 chat template parity, exact assistant-only loss masks, truncation, packing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
from megatron_qwen.data.sft import DEFAULT_SYSTEM_PROMPT, check_messages, render, tokenize_conversation
from megatron_qwen.data.tokenizer import load_tokenizer
from megatron_qwen.training.step import pack_micro_batch
from tests.data_support import (TRL_QWEN2_5_TEMPLATE, destroy_single_rank, hf_qwen2_5_tokenizer, init_single_rank,
                                tiny_config,
                                write_jsonl)


def _m(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    [_m("user", "Hi"), _m("assistant", "Hello! How can I help?")],
    [_m("system", "You are terse."), _m("user", "2+2?"), _m("assistant", "4"), _m("user", "and 3+3?"),
     _m("assistant", "6")],
    [_m("user", "翻译：good morning"), _m("assistant", "早上好 ☀️"), _m("system", "Now answer in English."),
     _m("user", "Again?"), _m("assistant", "Good morning!")],
    [_m("system", ""), _m("user", "code please"), _m("assistant", "```py\nprint('hi')\n```\n\nDone.")],
    [_m("user", "say nothing"), _m("assistant", "")],
]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return hf_qwen2_5_tokenizer(tmp_path_factory.mktemp("qwen2_5"))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_render_equals_the_exported_and_trl_qwen2_5_templates(hf_tokenizer, index):
    # Token ids, not only text: what the exported tokenizer's own template gives (and trl's copy of
    # Qwen2.5's) is what we train on. Single and multi-turn, with and without a system message.
    messages = CONVERSATIONS[index]
    text, _ = render(messages)
    ids, _ = tokenize_conversation(messages, load_tokenizer())
    for template in (None, TRL_QWEN2_5_TEMPLATE.read_text()):
        assert text == hf_tokenizer.apply_chat_template(messages, tokenize=False, chat_template=template)
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, chat_template=template)
        assert ids.tolist() == expected["input_ids"]
    if messages[0]["role"] != "system":
        assert DEFAULT_SYSTEM_PROMPT in text


def _runs(mask: np.ndarray):
    """(start, end) of each maximal run of ones."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    return list(zip(edges[::2], edges[1::2]))


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
def test_loss_mask_is_exactly_assistant_content_and_im_end(index):
    tokenizer = load_tokenizer()
    messages = CONVERSATIONS[index]
    ids, mask = tokenize_conversation(messages, tokenizer)
    runs = _runs(mask.astype(np.int64))
    answers = [m["content"] + "<|im_end|>" for m in messages if m["role"] == "assistant"]
    assert [tokenizer.decode(ids[a:b]) for a, b in runs] == answers
    # Everything before each run ends with that turn's header, so no header token is a target.
    for a, _ in runs:
        assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant\n")


def test_straddling_newline_token_is_a_target():
    tokenizer = load_tokenizer()
    messages = [_m("user", "q"), _m("assistant", "\nanswer")]
    ids, mask = tokenize_conversation(messages, tokenizer)
    (a, b), = _runs(mask.astype(np.int64))
    # "\n" (header) + "\n" (content) merge into one token: it starts the target run.
    assert tokenizer.decode(ids[a:b]) == "\n\nanswer<|im_end|>"
    assert tokenizer.decode(ids[:a]).endswith("<|im_start|>assistant")


def test_bad_conversations_are_named():
    assert "non-empty list" in check_messages([])
    assert "role 'tool'" in check_messages([_m("tool", "x")])
    call = {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f", "arguments": {}}}]}
    assert check_messages([_m("user", "hi"), call]) == ("message 1 has tool_calls, which this renderer does not "
                                                        "support (nor the tool role); write the call into the "
                                                        "assistant content or drop the message")
    assert "content is int" in check_messages([_m("user", 3)])
    assert "no assistant message" in check_messages([_m("user", "hi")])
    assert check_messages(CONVERSATIONS[1]) is None


SEQ = 128


@pytest.fixture(scope="module")
def sft_env(tmp_path_factory):
    """A pre-tokenized conversation set (chat mode of the preprocessor) and a one-rank model."""
    from megatron_qwen.config.translate import to_transformer_config
    from megatron_qwen.model.build import build_model

    root = tmp_path_factory.mktemp("sft")
    rng = np.random.RandomState(0)
    convs = [[_m("user", f"question {i}: " + "why " * int(rng.randint(1, 12))),
              _m("assistant", f"answer {i}: " + "because " * int(rng.randint(1, 15)))] for i in range(24)]
    write_jsonl(root / "chat.jsonl", [{"messages": c} for c in convs])
    preprocess([str(root / "chat.jsonl")], str(root / "chat"), PreprocessOptions(chat=True, progress=False))
    cfg = _cfg(root, SEQ, pack=True)
    init_single_rank(cfg)
    model = build_model(cfg.model, to_transformer_config(cfg), seed=3)[0].eval()
    yield root, model
    destroy_single_rank()


def _cfg(root, seq, pack, source="chat"):
    cfg = tiny_config(type="sft", blend=[DataBlendEntry(str(root / source), 1.0)], split="100,0,0",
                      cache_dir=str(root / "cache"), extra={"pack": pack})
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_length=seq),
                               stage=dataclasses.replace(cfg.stage, name="sft"))


def test_packed_sample_layout(sft_env):
    root, _ = sft_env
    train, valid = build_datasets(_cfg(root, SEQ, pack=True), 8, 0)
    assert valid is None
    sample, inner = train[0], train.datasets[0]
    cu = sample["cu_seqlens"].tolist()
    bounds = cu[:cu.index(SEQ) + 1]
    assert len(cu) == SEQ + 1 and set(cu[len(bounds):]) <= {SEQ}
    conversations = inner.packs[int(train.dataset_sample_index[0])].tolist()
    assert len(conversations) >= 2  # short conversations share a sequence
    for (start, end), conv in zip(zip(bounds, bounds[1:]), conversations):
        ids, mask = inner.dataset.get(conv, int(inner.dataset.tokens.sequence_lengths[conv]))
        assert sample["position_ids"][start:end].tolist() == list(range(end - start))
        assert sample["tokens"][start:end].tolist() == ids[:-1].tolist()
        assert sample["labels"][start:end].tolist() == ids[1:].tolist()
        assert sample["loss_mask"][start:end].tolist() == mask[1:].tolist()
    padding_start = bounds[len(conversations)]
    assert sample["loss_mask"][padding_start:].sum() == 0


def test_packed_conversations_are_padded_for_context_parallel(sft_env):
    # Under CP each packed conversation is split into 2*cp chunks: its span is padded to a multiple.
    root, _ = sft_env
    cfg = _cfg(root, SEQ, pack=True)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, extra={"pack": True, "pad_to_multiple_of": 8}))
    train, _ = build_datasets(cfg, 8, 0)
    inner = train.datasets[0]
    for i in range(4):
        sample = train[i]
        bounds = sorted(set(sample["cu_seqlens"].tolist()))
        assert bounds[0] == 0 and bounds[-1] == SEQ and all((b - a) % 8 == 0 for a, b in zip(bounds, bounds[1:]))
        conversations = inner.packs[int(train.dataset_sample_index[i])].tolist()
        assert len(bounds) - 1 in (len(conversations), len(conversations) + 1)  # (+ trailing padding)
        for start, end, conv in zip(bounds, bounds[1:], conversations):
            ids, mask = inner.dataset.get(conv, int(inner.dataset.tokens.sequence_lengths[conv]))
            n = len(ids) - 1
            assert end - start == -(-n // 8) * 8
            assert sample["tokens"][start:start + n].tolist() == ids[:-1].tolist()
            assert sample["labels"][start:start + n].tolist() == ids[1:].tolist()
            assert sample["loss_mask"][start:start + n].tolist() == mask[1:].tolist()
            assert sample["loss_mask"][start + n:end].sum() == 0
            assert sample["position_ids"][start:end].tolist() == list(range(end - start))


def _losses_by_segment(model, batch):
    flat, packed = pack_micro_batch(batch)
    with torch.no_grad():
        loss = model(flat["tokens"], flat["position_ids"], None, labels=flat["labels"],
                     packed_seq_params=packed).reshape(-1)  # [b*s]
    mask = flat["loss_mask"].reshape(-1)
    cu = packed.cu_seqlens_q.tolist()
    return [((loss[a:b] * mask[a:b]).sum() / mask[a:b].sum()).item()
            for a, b in zip(cu, cu[1:]) if mask[a:b].sum() > 0]


def test_packed_loss_equals_unpacked_per_conversation(sft_env):
    root, model = sft_env
    packed_ds, _ = build_datasets(_cfg(root, SEQ, pack=True), 8, 0)
    batch = {k: torch.stack([packed_ds[i][k] for i in range(2)]) for k in packed_ds[0] if k != "dataset_id"}
    packed_losses = _losses_by_segment(model, batch)  # b=2 rows flattened into one THD row
    inner = packed_ds.datasets[0]
    expected = []
    for row in range(2):
        for conv in inner.packs[int(packed_ds.dataset_sample_index[row])].tolist():
            ids, mask = inner.dataset.get(conv, int(inner.dataset.tokens.sequence_lengths[conv]))
            tokens = torch.from_numpy(ids[:-1].astype(np.int64))[None]
            labels = torch.from_numpy(ids[1:].astype(np.int64))[None]
            m = torch.from_numpy(mask[1:].astype(np.float32))
            with torch.no_grad():
                loss = model(tokens, torch.arange(tokens.shape[1])[None], None, labels=labels).reshape(-1)
            expected.append(((loss * m).sum() / m.sum()).item())
    assert len(packed_losses) == len(expected) >= 4
    assert np.allclose(packed_losses, expected, rtol=0, atol=1e-5), (packed_losses, expected)


def test_unpacked_dataset_has_one_conversation_per_sample(sft_env):
    root, model = sft_env
    plain, _ = build_datasets(_cfg(root, SEQ, pack=False), 6, 0)
    sample = plain[0]
    assert "cu_seqlens" not in sample
    assert all(len(p) == 1 for p in plain.datasets[0].packs)


def test_truncation_keeps_the_start_and_drops_conversations_without_targets(tmp_path, sft_env, caplog):
    long_question = [_m("user", "word " * 80), _m("assistant", "late answer")]
    long_answer = [_m("user", "hi"), _m("assistant", "ok " * 80)]
    write_jsonl(tmp_path / "long.jsonl", [{"messages": long_question}, {"messages": long_answer}])
    preprocess([str(tmp_path / "long.jsonl")], str(tmp_path / "long"), PreprocessOptions(chat=True, progress=False))
    train, _ = build_datasets(_cfg(tmp_path, 32, pack=True, source="long"), 2, 0)
    inner = train.datasets[0]
    assert inner.conversations.tolist() == [1]  # the long question left no target within 33 tokens
    assert "dropped 1 of 2 conversations" in caplog.text
    sample = train[0]
    ids, _ = tokenize_conversation(long_answer, load_tokenizer())
    assert sample["tokens"].tolist() == ids[:32].tolist() and sample["labels"].tolist() == ids[1:33].tolist()
    assert sample["cu_seqlens"][:2].tolist() == [0, 32]
