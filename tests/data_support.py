"""Shared pieces of the data tests: a single-rank process group, corpora, the Qwen2.5 tokenizer and template."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Iterable, List

import torch

from megatron_qwen.config.schema import Config
from megatron_qwen.data.tokenizer import write_qwen2_5_tokenizer

# trl's copy of Qwen2.5-Instruct's chat template ("Original Qwen2.5 chat template"): the reference
# for ours. NOTE: located without importing trl (a slow import the data tests do not need).
TRL_QWEN2_5_TEMPLATE = Path(importlib.util.find_spec("trl").submodule_search_locations[0]) / "chat_templates" \
    / "qwen2_5.jinja"


def hf_qwen2_5_tokenizer(directory: Path):
    """transformers' tokenizer of the default Qwen2.5 tokenizer files (what every export carries),
    written into ``directory``."""
    from transformers import AutoTokenizer

    Path(directory).mkdir(parents=True, exist_ok=True)
    write_qwen2_5_tokenizer(directory)
    return AutoTokenizer.from_pretrained(str(directory))


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
