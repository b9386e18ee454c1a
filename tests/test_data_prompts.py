"""GRPO prompt data: chat-template parity of generation prompts, the loader's bad-input contract,
and the synthetic arithmetic task behind data/grpo/example.jsonl."""

from __future__ import annotations

import pytest

from megatron_qwen.data.preprocess import InputError
from megatron_qwen.data.prompts import (PromptExample, arithmetic_prompts, load_prompts, render_prompt,
                                        tokenize_prompts, write_prompts)
from megatron_qwen.data.tokenizer import load_tokenizer
from tests.data_support import hf_qwen2_5_tokenizer, write_jsonl
from tests.helpers import REPO

GOOD = {"prompt": [{"role": "user", "content": "What is 2 + 3?"}], "answer": "5"}
PROMPTS = [
    [{"role": "user", "content": "What is 2 + 3?"}],
    [{"role": "system", "content": "Answer with a number."}, {"role": "user", "content": "7 - 4?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
     {"role": "user", "content": "1+1?"}],
]


def test_prompts_render_and_tokenize_as_the_exported_generation_prompt(tmp_path):
    hf = hf_qwen2_5_tokenizer(tmp_path)  # the tokenizer files every export carries, with their template
    ids = tokenize_prompts([PromptExample(p, "") for p in PROMPTS], load_tokenizer())
    for messages, ours in zip(PROMPTS, ids):
        assert render_prompt(messages) == hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours == hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"]


def test_example_file_is_the_seeded_arithmetic_task():
    examples = load_prompts([str(REPO / "data" / "grpo" / "example.jsonl")]).examples
    assert examples == arithmetic_prompts(64, seed=0)
    assert all(int(e.answer) == sum(map(int, e.prompt[-1]["content"][8:-1].split(" + "))) for e in examples)
    assert arithmetic_prompts(64, seed=1) != examples
    system = arithmetic_prompts(2, seed=0, system="Be brief.")
    assert system[0].prompt[0] == {"role": "system", "content": "Be brief."} and system[0].answer == examples[0].answer


BAD = {
    "malformed": ('{"prompt": [', "malformed JSON"),
    "not_object": ("[1, 2]", "expected a JSON object, got list"),
    "no_answer": ('{"prompt": [{"role": "user", "content": "x"}]}', "no key 'answer' \\(keys: prompt\\)"),
    "bad_role": ('{"prompt": [{"role": "tool", "content": "x"}], "answer": "1"}',
                 "'prompt': message 0 has role 'tool'"),
    "ends_assistant": ('{"prompt": [{"role": "assistant", "content": "x"}], "answer": "1"}',
                       "'prompt' ends with an assistant message"),
    "number_answer": ('{"prompt": [{"role": "user", "content": "x"}], "answer": 5}',
                      "'answer' is int, expected a string"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_lines_name_file_and_line_or_are_counted(tmp_path, case):
    line, message = BAD[case]
    path = write_jsonl(tmp_path / "p.jsonl", [GOOD])
    path.write_text(path.read_text() + "\n" + line + "\n")  # a blank line (ignored), then line 3
    with pytest.raises(InputError, match=f"{path}:3: {message}.*skip_bad_lines"):
        load_prompts([str(path)])
    loaded = load_prompts([str(path)], skip_bad_lines=True)
    assert loaded.examples == [PromptExample(GOOD["prompt"], "5")] and loaded.bad_lines == 1
    assert loaded.bad_examples[0].startswith(f"{path}:3: ")


def test_invalid_utf8_missing_file_and_nothing_usable(tmp_path):
    path = tmp_path / "bytes.jsonl"
    path.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(InputError, match=f"{path}:1: not valid UTF-8"):
        load_prompts([str(path)])
    with pytest.raises(InputError, match="no usable prompt .* \\(1 bad lines\\)"):
        load_prompts([str(path)], skip_bad_lines=True)
    with pytest.raises(InputError, match="cannot read file"):
        load_prompts([str(tmp_path / "missing.jsonl")], skip_bad_lines=True)


def test_write_then_load_round_trip(tmp_path):
    examples = arithmetic_prompts(5, seed=3, system="Sum.") + [PromptExample(PROMPTS[2], "2 ☀")]
    write_prompts(examples, tmp_path / "out.jsonl")
    assert load_prompts([str(tmp_path / "out.jsonl")]).examples == examples
