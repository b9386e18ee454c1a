"""Prompts with verifiable answers for online RL (GRPO), and a synthetic arithmetic task.

A record is one JSONL line ``{"prompt": [messages], "answer": "..."}``: the conversation so
far (system/user/assistant turns, ending with a user or system turn) and the reference
answer a reward checks the completion against. The prompt is rendered with the Qwen2.5 chat
template followed by the assistant header (``apply_chat_template(...,
add_generation_prompt=True)``), so the model writes the next assistant turn.

Bad input follows :mod:`megatron_qwen.data.preprocess`: malformed JSON, invalid UTF-8, a
missing key or a wrong type stops loading with one line naming file and line, unless
``skip_bad_lines`` counts and skips it; an unreadable file always stops it.

The arithmetic task is :mod:`megatron_qwen.data.arithmetic`'s (``What is a + b?``, answer
``a+b``; the questions of its SFT conversations for the same seed), so a model fine-tuned on
that task is rewarded for the same skill in GRPO. ``data/grpo/example.jsonl`` is
``arithmetic_prompts(64, seed=0)``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_qwen.data.arithmetic import prompt_messages, questions
from megatron_qwen.data.records import InputError, jsonl_values
from megatron_qwen.data.sft import message_list_problem, render
from megatron_qwen.data.tokenizer import IM_START, QwenTokenizer


@dataclass(frozen=True)
class PromptExample:
    """One prompt (chat messages) and its reference answer."""

    prompt: List[Dict[str, str]]
    answer: str


@dataclass
class PromptSet:
    """The usable examples of some files, and what was skipped."""

    examples: List[PromptExample] = field(default_factory=list)
    bad_lines: int = 0
    bad_examples: List[str] = field(default_factory=list)  # the first few "file:line: problem"


def render_prompt(messages: Sequence[Dict[str, str]]) -> str:
    """Chat-template text asking for the next assistant turn."""
    return render(messages)[0] + f"{IM_START}assistant\n"


def record_problem(record: object) -> Optional[str]:
    """The problem with a prompt record, or None when it is usable."""
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    missing = [key for key in ("prompt", "answer") if key not in record]
    if missing:
        return f"no key {missing[0]!r} (keys: {', '.join(map(str, record)) or 'none'})"
    problem = message_list_problem(record["prompt"])
    if problem is not None:
        return f"'prompt': {problem}"
    if record["prompt"][-1]["role"] == "assistant":
        return "'prompt' ends with an assistant message; the model writes that turn, so end with a user turn"
    if not isinstance(record["answer"], str):
        return f"'answer' is {type(record['answer']).__name__}, expected a string (quote numbers: \"42\")"
    return None


def load_prompts(paths: Sequence[str], skip_bad_lines: bool = False) -> PromptSet:
    """Every usable record of the JSONL (or JSONL.gz) files, in order.

    Raises:
        InputError: on the first bad record (unless ``skip_bad_lines``), an unreadable file,
            or when no usable record is left.
    """
    prompts = PromptSet()
    for name in paths:
        for line_no, record, problem in jsonl_values(Path(name), None):
            problem = problem or record_problem(record)
            if problem is None:
                prompts.examples.append(PromptExample(record["prompt"], record["answer"]))
            elif not skip_bad_lines:
                raise InputError(f"{name}:{line_no}: {problem}; fix the line or skip bad lines (skip_bad_lines)")
            else:
                prompts.bad_lines += 1
                if len(prompts.bad_examples) < 5:
                    prompts.bad_examples.append(f"{name}:{line_no}: {problem}")
    if not prompts.examples:
        raise InputError(f"no usable prompt in {', '.join(map(str, paths))} ({prompts.bad_lines} bad lines); "
                         f"each line needs {{\"prompt\": [messages], \"answer\": \"...\"}}")
    return prompts


def tokenize_prompts(examples: Sequence[PromptExample], tokenizer: QwenTokenizer) -> List[List[int]]:
    """Token ids of each rendered prompt (what the rollout engine receives)."""
    return tokenizer.encode_batch([render_prompt(e.prompt) for e in examples])


def arithmetic_prompts(count: int, seed: int = 0, max_operand: int = 9,
                       system: Optional[str] = None) -> List[PromptExample]:
    """``count`` questions ``What is a + b?`` with 0 <= a, b <= ``max_operand``, a function of ``seed``."""
    return [PromptExample(prompt_messages(question, system), str(answer))
            for _, question, answer in questions(count, seed, max_operand)]


def write_prompts(examples: Sequence[PromptExample], path: Path) -> None:
    """Writes ``examples`` as prompt JSONL (one record per line)."""
    lines = [json.dumps({"prompt": e.prompt, "answer": e.answer}, ensure_ascii=False) for e in examples]
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")
