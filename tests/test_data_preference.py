"""Preference data: trl's formats, chat-template tokens, response-only masks, bad input, truncation."""

from __future__ import annotations

import dataclasses
import json
import re
import sys

import numpy as np
import pytest

from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.data.arithmetic import preference_pairs, sft_conversations
from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.data.preference import check_pair, tokenize_pair
from megatron_qwen.data.preprocess import InputError, PreprocessOptions, preprocess
from megatron_qwen.data.tokenizer import load_tokenizer
from tests.data_support import (destroy_single_rank, hf_qwen2_5_tokenizer, init_single_rank, tiny_config,
                                write_jsonl)
from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "tools"))
import preprocess_data  # noqa: E402  (the CLI module under test)


def _m(role, content):
    return {"role": role, "content": content}


PAIR = {"prompt": [_m("system", "Be brief."), _m("user", "Capital of France?"), _m("assistant", "Paris."),
                   _m("user", "And of Italy?")],
        "chosen": [_m("assistant", "Rome.")], "rejected": [_m("assistant", "Milan, I think.")]}
PREFERENCE = PreprocessOptions(preference=True, progress=False)


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return hf_qwen2_5_tokenizer(tmp_path_factory.mktemp("qwen2_5"))


def test_sides_are_trl_tokens_with_the_response_as_target(hf_tokenizer):
    # trl tokenizes apply_chat_template(prompt + response) and takes the completion after the
    # generation prompt; ours is the same ids, the target being that completion up to <|im_end|>.
    sides = tokenize_pair(PAIR, load_tokenizer())
    prompt_ids = hf_tokenizer.apply_chat_template(PAIR["prompt"], add_generation_prompt=True)["input_ids"]
    for (ids, mask), key in zip(sides, ("chosen", "rejected")):
        full = hf_tokenizer.apply_chat_template(PAIR["prompt"] + PAIR[key])
        assert ids.tolist() == full["input_ids"]
        assert np.flatnonzero(mask).tolist() == list(range(len(prompt_ids), len(ids) - 1))  # not the final "\n"
        assert hf_tokenizer.decode(ids[mask == 1]) == PAIR[key][0]["content"] + "<|im_end|>"


def test_plain_strings_are_one_user_and_one_assistant_turn():
    tokenizer = load_tokenizer()
    plain = {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"}
    conversational = {"prompt": [_m("user", "What is 2 + 2?")], "chosen": [_m("assistant", "4")],
                      "rejected": [_m("assistant", "5")]}
    for (a, ma), (b, mb) in zip(tokenize_pair(plain, tokenizer), tokenize_pair(conversational, tokenizer)):
        assert a.tolist() == b.tolist() and ma.tolist() == mb.tolist()


BAD = [  # (record, expected problem)
    ({"prompt": "q", "chosen": "a"}, "no key 'rejected'"),
    ({"prompt": "q", "chosen": "", "rejected": "b"}, "the chosen response is empty"),
    ({"prompt": "q", "chosen": [_m("assistant", " ")], "rejected": "b"}, "the chosen response is empty"),
    ({"prompt": 5, "chosen": "a", "rejected": "b"}, "'prompt' is int, expected a list of messages or a string"),
    ({"prompt": {"role": "user"}, "chosen": "a", "rejected": "b"}, "'prompt' is dict"),
    ({"prompt": [_m("robot", "q")], "chosen": "a", "rejected": "b"}, "role 'robot'"),
    ({"prompt": "q", "chosen": "a", "rejected": [_m("user", "b")]}, "'rejected' holds a non-assistant message"),
    ([1, 2], "expected a JSON object"),
]


@pytest.mark.parametrize("record,problem", BAD, ids=[p for _, p in BAD])
def test_bad_record_stops_at_file_and_line_with_no_output(tmp_path, record, problem):
    assert problem in check_pair(record)
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, record, PAIR])
    with pytest.raises(InputError, match=rf"pairs.jsonl:2: .*{re.escape(problem)}"):
        preprocess([str(source)], str(tmp_path / "out"), PREFERENCE)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.jsonl"]


def test_cli_preference_documents_skip_bad_lines_and_errors(tmp_path, capsys):
    source = write_jsonl(tmp_path / "pairs.jsonl", [PAIR, BAD[1][0], PAIR, BAD[0][0]])
    cli = ["--input", str(source), "--preference", "--quiet"]
    assert preprocess_data.main(cli + ["--output-prefix", str(tmp_path / "bad")]) == 2
    assert capsys.readouterr().err.strip() == \
        f"error: {source}:2: the chosen response is empty; fix the line or pass --skip-bad-lines"
    assert not list(tmp_path.glob("bad*"))
    assert preprocess_data.main(cli + ["--output-prefix", str(tmp_path / "out"), "--skip-bad-lines"]) == 0
    out = capsys.readouterr().out
    assert "2 documents" in out and "2 bad lines" in out
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    tokens = IndexedDataset(str(tmp_path / "out"))
    assert tokens.document_indices.tolist() == [0, 2, 4]  # one document of two sequences per pair
    chosen, rejected = tokenize_pair(PAIR, load_tokenizer())
    assert tokens[0].tolist() == chosen[0].tolist() and tokens[1].tolist() == rejected[0].tolist()
    assert preprocess_data.main(cli + ["--output-prefix", str(tmp_path / "x"), "--json-key", "text"]) == 2
    assert "--json-key does not apply to --preference" in capsys.readouterr().err


def test_generator_is_deterministic_with_correct_chosen_and_near_miss_rejected(tmp_path):
    pairs = preference_pairs(64, seed=3, plain_every=4)
    assert pairs == preference_pairs(64, seed=3, plain_every=4) != preference_pairs(64, seed=4, plain_every=4)
    for i, pair in enumerate(pairs):
        assert check_pair(pair) is None
        question = pair["prompt"] if isinstance(pair["prompt"], str) else pair["prompt"][-1]["content"]
        a, b = (int(x) for x in question.removeprefix("What is ").removesuffix("?").split(" + "))
        chosen = pair["chosen"] if isinstance(pair["chosen"], str) else pair["chosen"][0]["content"]
        rejected = pair["rejected"] if isinstance(pair["rejected"], str) else pair["rejected"][0]["content"]
        assert int(chosen) == a + b and 1 <= abs(int(rejected) - a - b) <= 3 and int(rejected) >= 0
        assert isinstance(pair["prompt"], str) == (i % 4 == 3)
    assert sft_conversations(2, seed=1)[0]["messages"][-1]["role"] == "assistant"
    run_cli([sys.executable, "tools/make_preference_data.py", "--out", str(tmp_path / "a.jsonl"), "--pairs", "256",
             "--seed", "0", "--plain-every", "4"])
    assert (tmp_path / "a.jsonl").read_text() == open("data/dpo/example.jsonl").read()  # the shipped example


SEQ = 40


def _cfg(root, source, seq=SEQ):
    cfg = tiny_config(type="preference", blend=[DataBlendEntry(str(source), 1.0)], split="100,0,0",
                      cache_dir=str(root / "cache"))
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seq_length=seq),
                               stage=dataclasses.replace(cfg.stage, name="dpo"))


@pytest.fixture(scope="module")
def one_rank():
    init_single_rank(tiny_config())
    yield
    destroy_single_rank()


def test_samples_hold_both_sides_and_raw_files_equal_prefixes(tmp_path, one_rank):
    pairs = preference_pairs(12, seed=0)
    source = write_jsonl(tmp_path / "pairs.jsonl", pairs)
    preprocess([str(source)], str(tmp_path / "pairs"), PREFERENCE)
    from_raw, _ = build_datasets(_cfg(tmp_path, source), 30, 0)
    from_prefix, _ = build_datasets(_cfg(tmp_path, tmp_path / "pairs"), 30, 0)
    assert len(from_raw) >= 30
    inner = from_raw.datasets[0]
    for i in range(len(from_raw)):
        sample, other = from_raw[i], from_prefix[i]
        assert all(np.array_equal(sample[k], other[k]) for k in ("tokens", "labels", "loss_mask"))
        pair = int(inner.pairs[inner.order[int(from_raw.dataset_sample_index[i])]])
        for side, (ids, mask) in enumerate(tokenize_pair(pairs[pair], load_tokenizer())):
            n = len(ids) - 1
            assert sample["tokens"].shape == (2, SEQ) and sample["tokens"][side, :n].tolist() == ids[:-1].tolist()
            assert sample["labels"][side, :n].tolist() == ids[1:].tolist()
            assert sample["loss_mask"][side].tolist() == mask[1:].tolist() + [0.0] * (SEQ - n)


def test_truncation_keeps_the_prompt_and_drops_pairs_without_a_response(tmp_path, one_rank, caplog):
    tokenizer = load_tokenizer()
    fits = {"prompt": "hi", "chosen": "ok " * 40, "rejected": "no"}  # chosen is cut after the prompt
    cut = {"prompt": "word " * 60, "chosen": "a", "rejected": "b"}  # the prompt alone fills the sequence
    source = write_jsonl(tmp_path / "long.jsonl", [fits, cut])
    train, _ = build_datasets(_cfg(tmp_path, source), 2, 0)
    inner = train.datasets[0]
    assert inner.pairs.tolist() == [0]
    assert "2 of 2 pairs exceed 41 tokens and have their responses cut; 1 of those" in caplog.text
    ids, _ = tokenize_pair(fits, tokenizer)[0]
    assert train[0]["tokens"][0].tolist() == ids[:SEQ].tolist() and train[0]["loss_mask"][0, -1] == 1


def test_sft_prefix_is_not_preference_data(tmp_path, one_rank):
    write_jsonl(tmp_path / "chat.jsonl", [{"messages": [_m("user", "q"), _m("assistant", "a")]}] * 4)
    preprocess([str(tmp_path / "chat.jsonl")], str(tmp_path / "chat"), PreprocessOptions(chat=True, progress=False))
    with pytest.raises(ValueError, match="does not hold preference pairs.*--preference"):
        build_datasets(_cfg(tmp_path, tmp_path / "chat"), 2, 0)


def test_example_set_is_valid_trl_data():
    lines = open("data/dpo/example.jsonl").read().splitlines()
    assert len(lines) == 256 and all(check_pair(json.loads(line)) is None for line in lines)
