"""The bundled Qwen2.5 tokenizer: special-token ids, parity with transformers, user directories."""

from __future__ import annotations

import shutil

import pytest

from megatron_qwen.data.tokenizer import (EOD_TOKEN_ID, QWEN2_5_SPECIAL_TOKENS, TokenizerError,
                                          bundled_tokenizer_dir, load_tokenizer)
from tests.data_support import CORPUS


@pytest.fixture(scope="module")
def hf_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(bundled_tokenizer_dir()))


def test_bundled_special_tokens_have_qwen2_5_ids():
    tokenizer = load_tokenizer()
    ids = [tokenizer.token_id(token) for token in QWEN2_5_SPECIAL_TOKENS]
    assert ids == list(range(151643, 151665))
    assert tokenizer.eod == EOD_TOKEN_ID == tokenizer.token_id("<|endoftext|>")
    assert tokenizer.token_id("<|im_start|>") == 151644 and tokenizer.token_id("<|im_end|>") == 151645
    assert tokenizer.vocab_size <= 151936  # fits the padded Qwen2.5 embedding


def test_ids_equal_transformers(hf_tokenizer):
    tokenizer = load_tokenizer()
    for text in CORPUS:
        assert tokenizer.encode(text) == hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert tokenizer.encode_batch(CORPUS) == [tokenizer.encode(t) for t in CORPUS]
    assert tokenizer.decode(tokenizer.encode(CORPUS[1])) == CORPUS[1]


def test_user_tokenizer_directory(tmp_path):
    shutil.copy(bundled_tokenizer_dir() / "tokenizer.json", tmp_path / "tokenizer.json")
    user = load_tokenizer(str(tmp_path))
    assert user.encode(CORPUS[2]) == load_tokenizer().encode(CORPUS[2])
    assert user.unique_identifiers == load_tokenizer().unique_identifiers


def test_bad_tokenizer_directories(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(str(tmp_path / "missing"))
    with pytest.raises(TokenizerError, match="no tokenizer.json"):
        load_tokenizer(str(tmp_path))
