"""SFT conversations: the Qwen2.5 chat template and the assistant-only loss mask.

A conversation is ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
It is rendered exactly as Qwen2.5-Instruct's chat template (``qwen2_5/tokenizer_config.json``, the
default tokenizer's template) renders it without tools::

    <|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n{...}<|im_end|>\\n<|im_start|>assistant\\n{...}<|im_end|>\\n

with the default system prompt when the first message is not a system message. The
rendered text is tokenized in one piece (so the ids equal ``apply_chat_template``'s) and a
token is a training target exactly when its characters overlap an assistant message's
content or that message's closing ``<|im_end|>``. Role headers, the newline after
``<|im_end|>``, system and user turns are masked out.

Truncation (applied when sequences are packed, see :mod:`megatron_qwen.data.sft_dataset`):
a conversation longer than the sequence length + 1 tokens keeps its first tokens and loses
the rest (later turns are cut, never earlier ones); a conversation left without any
target token is dropped and counted.

Tool calls (``tool_calls``, the ``tool`` role) are refused with a message naming the message:
Qwen2.5's template renders them (``<tool_call>`` JSON, results in ``<tool_response>`` inside a user
turn), this renderer does not.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import numpy as np

from megatron_qwen.data.tokenizer import IM_END, IM_START, QwenTokenizer

DEFAULT_SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant")


def message_list_problem(messages: object) -> Optional[str]:
    """The problem with a list of messages, or None when it can be rendered."""
    if not isinstance(messages, list) or not messages:
        return f"expected a non-empty list of messages, got {type(messages).__name__}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"message {i} is {type(message).__name__}, expected an object with role and content"
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            return f"message {i} has role {role!r}; supported roles are {', '.join(ROLES)}"
        if not isinstance(content, str):
            return f"message {i} content is {type(content).__name__}, expected a string"
        if message.get("tool_calls"):
            return (f"message {i} has tool_calls, which this renderer does not support (nor the tool role); "
                    f"write the call into the assistant content or drop the message")
    return None


def check_messages(messages: object) -> Optional[str]:
    """The problem with an SFT conversation, or None when it can be rendered and trained on."""
    problem = message_list_problem(messages)
    if problem is None and not any(m["role"] == "assistant" for m in messages):
        return "no assistant message: nothing to train on"
    return problem


def render(messages: Sequence[dict], first_target: int = 0) -> Tuple[str, List[Tuple[int, int]]]:
    """Chat-template text and the character spans that are training targets (the assistant
    messages from index ``first_target`` on; a preference pair's prompt turns are not)."""
    parts: List[str] = []
    targets: List[Tuple[int, int]] = []
    length = 0
    if messages[0]["role"] != "system":
        parts.append(f"{IM_START}system\n{DEFAULT_SYSTEM_PROMPT}{IM_END}\n")
        length = len(parts[0])
    for index, message in enumerate(messages):
        header = f"{IM_START}{message['role']}\n"
        body = f"{message['content']}{IM_END}"
        if message["role"] == "assistant" and index >= first_target:
            start = length + len(header)
            targets.append((start, start + len(body)))
        turn = f"{header}{body}\n"
        parts.append(turn)
        length += len(turn)
    return "".join(parts), targets


def tokenize_conversation(messages: Sequence[dict], tokenizer: QwenTokenizer,
                          first_target: int = 0) -> Tuple[np.ndarray, np.ndarray]:
    """Token ids [n] and their loss mask [n] (1 = the token is a training target, see :func:`render`)."""
    text, targets = render(messages, first_target)
    ids, offsets = tokenizer.encode_with_offsets(text)
    spans = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)  # [n, 2] character (start, end)
    t_start, t_end = np.asarray(targets, dtype=np.int64).reshape(-1, 2).T  # sorted, disjoint
    # First target ending after each token's start; the token overlaps it iff it starts before the
    # token ends. NOTE: a token may straddle a header and its content (e.g. "\n\n" when the content
    # starts with a newline); it is a target because predicting it emits content characters.
    j = np.searchsorted(t_end, spans[:, 0], side="right")
    inside = j < len(t_end)
    mask = np.zeros(len(ids), dtype=np.uint8)
    mask[inside] = t_start[j[inside]] < spans[inside, 1]
    return np.asarray(ids, dtype=np.int64), mask
