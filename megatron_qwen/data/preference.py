"""Preference pairs in trl's format, rendered with the Qwen2.5 chat template.

A record is ``{"prompt": ..., "chosen": ..., "rejected": ...}`` in one of trl's two forms:

- conversational: ``prompt`` is a list of messages (system / user / assistant turns, see
  :mod:`megatron_qwen.data.sft`), ``chosen`` and ``rejected`` are lists of assistant messages;
- plain strings: ``prompt`` is the user's message and ``chosen`` / ``rejected`` the assistant's
  replies (a string response to a message-list prompt is one assistant message too).

Each side of a pair is ``prompt + response`` rendered as one conversation (the default
system prompt is added when the prompt has none) and tokenized in one piece, like SFT. The
loss mask covers the response: its assistant messages' content and closing ``<|im_end|>``,
not the prompt's turns. (trl also scores the ``\\n`` after the final ``<|im_end|>``, which
Qwen never generates; this is the only difference to trl's completion mask.)

Truncation (applied when samples are built, see :mod:`megatron_qwen.data.preference_dataset`):
a side longer than the sequence length + 1 tokens keeps its first tokens, so the prompt is
kept and the response cut; a pair where either side is left without a response token is
dropped and counted.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import numpy as np

from megatron_qwen.data.sft import message_list_problem, tokenize_conversation
from megatron_qwen.data.tokenizer import QwenTokenizer

KEYS = ("prompt", "chosen", "rejected")
Messages = List[dict]


def _as_prompt(prompt: object) -> object:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def _as_response(response: object) -> object:
    return [{"role": "assistant", "content": response}] if isinstance(response, str) else response


def _prompt_problem(prompt: object) -> Optional[str]:
    if isinstance(prompt, str):
        return None if prompt.strip() else "'prompt' is an empty string"
    if not isinstance(prompt, list):
        return f"'prompt' is {type(prompt).__name__}, expected a list of messages or a string"
    problem = message_list_problem(prompt)
    return None if problem is None else f"'prompt': {problem}"


def _response_problem(key: str, response: object) -> Optional[str]:
    if not isinstance(response, (str, list)):
        return f"{key!r} is {type(response).__name__}, expected a list of assistant messages or a string"
    messages = _as_response(response)
    problem = message_list_problem(messages)
    if problem is not None:
        return f"{key!r}: {problem}"
    if any(m["role"] != "assistant" for m in messages):
        return f"{key!r} holds a non-assistant message; put earlier turns in 'prompt'"
    if not any(m["content"].strip() for m in messages):
        return f"the {key} response is empty"
    return None


def check_pair(record: object) -> Optional[str]:
    """The problem with a preference record, or None when it can be trained on."""
    if not isinstance(record, dict):
        return f"expected a JSON object with keys {', '.join(KEYS)}, got {type(record).__name__}"
    missing = [key for key in KEYS if key not in record]
    if missing:
        return (f"no key {missing[0]!r} (keys: {', '.join(map(str, record)) or 'none'}); a preference record "
                f"needs {', '.join(KEYS)}")
    return _prompt_problem(record["prompt"]) or _response_problem("chosen", record["chosen"]) \
        or _response_problem("rejected", record["rejected"])


def pair_messages(record: dict) -> Tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) as message lists (plain strings become one user / assistant turn)."""
    return _as_prompt(record["prompt"]), _as_response(record["chosen"]), _as_response(record["rejected"])


def tokenize_pair(record: dict, tokenizer: QwenTokenizer) -> List[Tuple[np.ndarray, np.ndarray]]:
    """``[(chosen ids, chosen mask), (rejected ids, rejected mask)]`` of a checked record."""
    prompt, chosen, rejected = pair_messages(record)
    return [tokenize_conversation(prompt + response, tokenizer, first_target=len(prompt))
            for response in (chosen, rejected)]
