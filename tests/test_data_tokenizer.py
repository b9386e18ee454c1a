"""The default Qwen2.5 tokenizer: derived from the bundled (Qwen3) BPE files with exactly Qwen2.5's
added tokens, parity with transformers on the files every export carries, user directories."""

from __future__ import annotations

import json

import pytest
from megatron_qwen.data.sft import render
from megatron_qwen.data.tokenizer import (EOD_TOKEN_ID, QWEN2_5_CONFIG, QWEN2_5_SPECIAL_TOKENS, QwenTokenizer,
                                          TokenizerError, bundled_bpe_dir, check_qwen2_5_special_tokens,
                                          load_tokenizer, qwen2_5_tokenizer_json, write_qwen2_5_tokenizer)
from tests.data_support import CORPUS, TRL_QWEN2_5_TEMPLATE, hf_qwen2_5_tokenizer

QWEN3_ONLY = ("<tool_response>", "</tool_response>", "<think>", "</think>")  # ids 151665..151668 in Qwen3
CHAT = [{"role": "user", "content": "Hi <tool_call>x</tool_call>"}, {"role": "assistant", "content": "<|fim_pad|>ok"}]


@pytest.fixture(scope="module")
def hf_tokenizer(tmp_path_factory):
    return hf_qwen2_5_tokenizer(tmp_path_factory.mktemp("qwen2_5"))


def test_default_is_qwen2_5_with_its_22_added_tokens():
    tokenizer = load_tokenizer()
    ids = [tokenizer.token_id(token) for token in QWEN2_5_SPECIAL_TOKENS]
    assert ids == list(range(151643, 151665))
    assert tokenizer.vocab_size == 151665  # Qwen2.5's count; the bundled (Qwen3) files have 151,669
    assert sorted(tokenizer.backend.get_added_tokens_decoder()) == ids
    assert tokenizer.eod == EOD_TOKEN_ID == tokenizer.token_id("<|endoftext|>")
    assert tokenizer.token_id("<|im_start|>") == 151644 and tokenizer.token_id("<|im_end|>") == 151645
    for token in QWEN3_ONLY:  # plain text in Qwen2.5: several ordinary BPE tokens, never an added id
        assert tokenizer.backend.token_to_id(token) is None
        ids = tokenizer.encode(f"a {token}b")
        assert max(ids) < EOD_TOKEN_ID and len(ids) > 3 and tokenizer.decode(ids) == f"a {token}b"


def test_ids_unchanged_from_the_bundled_files_except_the_qwen3_tokens():
    # Checkpoints trained with the bundled (Qwen3) tokenizer.json keep their ids for such text.
    bundled = QwenTokenizer.from_directory(bundled_bpe_dir())
    tokenizer = load_tokenizer()
    texts = CORPUS + [render(CHAT)[0] + "<|endoftext|><|file_sep|>def f():\n    return 1\n"]
    for text in texts:
        assert tokenizer.encode(text) == bundled.encode(text)
    assert bundled.encode("<think>x</think>") == [151667, 87, 151668]
    assert tokenizer.encode("<think>x</think>") != [151667, 87, 151668]
    # Data caches are keyed by the tokenizer.json digest: those built with the bundled file rebuild.
    assert tokenizer.digest != bundled.digest
    with pytest.raises(TokenizerError, match="151669 tokens, Qwen2.5 has 151665; 151665 <tool_response>"):
        check_qwen2_5_special_tokens(bundled)


def test_exported_files_load_in_transformers_with_qwen2_5s_template(hf_tokenizer, tmp_path):
    assert len(hf_tokenizer) == 151665
    assert hf_tokenizer.chat_template == TRL_QWEN2_5_TEMPLATE.read_text()
    assert (hf_tokenizer.eos_token, hf_tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    tokenizer = load_tokenizer()
    for text in CORPUS + ["<think>\nstep</think> <tool_response>r</tool_response>"]:
        assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode_batch(CORPUS) == [tokenizer.encode(t) for t in CORPUS]
    assert tokenizer.decode(tokenizer.encode(CORPUS[1])) == CORPUS[1]
    config = json.loads(QWEN2_5_CONFIG.read_text())
    assert {int(i): t["content"] for i, t in config["added_tokens_decoder"].items()} == \
        dict(enumerate(QWEN2_5_SPECIAL_TOKENS, EOD_TOKEN_ID))
    # The files of a directory are the default tokenizer's: same ids, same cache key.
    assert write_qwen2_5_tokenizer(tmp_path) == ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]
    user = load_tokenizer(str(tmp_path))
    assert user.unique_identifiers == tokenizer.unique_identifiers
    assert (tmp_path / "tokenizer.json").read_bytes() == qwen2_5_tokenizer_json().encode("utf-8")


def test_bad_tokenizer_directories(tmp_path, monkeypatch):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
    # Bundled files without Qwen2.5's special tokens are refused, not silently used.
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": [], "model": {}}')
    monkeypatch.setattr("megatron_qwen.data.tokenizer.bundled_bpe_dir", lambda: tmp_path)
    qwen2_5_tokenizer_json.cache_clear()
    try:
        with pytest.raises(TokenizerError, match="lacks some of Qwen2.5's special tokens"):
            qwen2_5_tokenizer_json()
    finally:
        qwen2_5_tokenizer_json.cache_clear()
