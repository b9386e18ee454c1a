"""The GRPO tests' task: the DPO tests' sums (a, b in 0..4) with their small BPE tokenizer.

A short SFT (:data:`SFT_ITERS` steps of the DPO learning test's SFT settings) leaves the tiny
model (vocab 256) in the middle of learning the sums: it answers in the format (a number and
``<|im_end|>``) and samples the right sum about a third of the time. GRPO then has a reward to
raise: exact match of the sum. Prompts are ~34 tokens, completions 2 (at most
``MAX_NEW_TOKENS``), so training rows of :data:`~tests.dpo_support.SEQ` = 40 tokens hold both.
"""

from __future__ import annotations

from pathlib import Path
from typing import List

from megatron_qwen.data.prompts import arithmetic_prompts, write_prompts
from tests.dpo_support import SEQ, TINY_MODEL, make_task
from tests.helpers import QUIET, run_train

MAX_OPERAND = 4
SFT_ITERS = 200
MAX_NEW_TOKENS = 4
CONSTANT_LR = ["optim.decay_style=constant", "optim.weight_decay=0.0"]


def make_grpo_task(root: Path) -> dict:
    """Tokenizer, SFT conversations, and train (256) / validation (32) prompt files under ``root``."""
    task = make_task(root, pairs=512, max_operand=MAX_OPERAND)
    task["prompts"] = root / "prompts.jsonl"
    task["valid"] = root / "valid.jsonl"
    write_prompts(arithmetic_prompts(256, seed=5, max_operand=MAX_OPERAND), task["prompts"])
    write_prompts(arithmetic_prompts(32, seed=6, max_operand=MAX_OPERAND), task["valid"])
    return task


def sft(task: dict, run_dir: Path, cache: Path) -> Path:
    """The short SFT on the task's conversations; returns its checkpoint directory."""
    run_train(run_dir, ["stage=sft", *TINY_MODEL, f"data.tokenizer={task['tokenizer']}",
                        f"data.blend=[{{path: '{task['sft']}', weight: 1.0}}]", "data.extra.pack=false",
                        f"data.cache_dir={cache}", f"train.seq_length={SEQ}", f"train.train_iters={SFT_ITERS}",
                        "train.micro_batch_size=16", "train.global_batch_size=16", "train.eval_interval=0",
                        *CONSTANT_LR, "optim.lr=3e-3", "optim.min_lr=3e-3", "optim.warmup_iters=5",
                        "checkpoint.save_interval=null", "logging.log_interval=100", *QUIET], tiny=False)
    return run_dir / "checkpoints"


def grpo_overrides(task: dict, start: Path) -> List[str]:
    """stage=grpo from ``start`` on the task: 16 prompts x 8 completions per step, lr 1e-3 constant,
    validation on the 32 held-out prompts (2 batches), logs every step."""
    return ["stage=grpo", *TINY_MODEL, f"data.tokenizer={task['tokenizer']}",
            f"data.blend=[{{path: '{task['prompts']}', weight: 1.0}}]",
            f"data.valid_blend=[{{path: '{task['valid']}', weight: 1.0}}]", f"checkpoint.load={start}",
            f"train.seq_length={SEQ}", f"stage.max_new_tokens={MAX_NEW_TOKENS}", "stage.group_size=8",
            "train.micro_batch_size=4", "train.global_batch_size=16", "train.eval_iters=2", *CONSTANT_LR,
            "optim.lr=1e-3", "optim.min_lr=1e-3", "optim.warmup_iters=0", "checkpoint.save_interval=null",
            "checkpoint.save_at_end=false", "logging.log_interval=1", *QUIET]
