"""The prompt datasets of stage=grpo: what a step's rollouts start from, resumable by position.

``data.type=prompts``: the ``data.blend`` files (prompt JSONL, :mod:`megatron_qwen.data.prompts`)
are read and concatenated in order and split by example into train and validation by
``data.split`` (contiguous ranges, as megatron splits documents), or validation is all of
``data.valid_blend``. ``data.extra.skip_bad_lines`` skips unusable lines instead of stopping.

A sample is one prompt; sample ``k`` of the training set is the ``k``-th prompt the run
trains on: epoch ``k // n`` visits the ``n`` training prompts in a permutation drawn from
``(train.seed, epoch)``, so the order is a function of the seed and a resumed run (which
continues at ``consumed_samples``) sees the prompts the uninterrupted run would. The
validation set is its prompts in file order, repeated to fill ``eval_iters`` batches.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

from megatron_qwen.config.schema import Config, DataBlendEntry
from megatron_qwen.data.prompts import PromptExample, load_prompts, tokenize_prompts
from megatron_qwen.data.records import InputError
from megatron_qwen.data.tokenizer import IM_END, QwenTokenizer, load_tokenizer


@dataclass
class PromptPool:
    """Tokenized prompts and their reference answers, in file order."""

    prompt_ids: List[List[int]]
    answers: List[str]

    def __len__(self) -> int:
        return len(self.answers)


class PromptDataset(torch.utils.data.Dataset):
    """Sample ``k`` -> one prompt of ``pool``, right-padded to ``width`` tokens.

    Fields: ``prompt_ids`` [width], ``prompt_length``, ``example`` (index into the pool, for its
    answer) and ``position`` (``k``: the rollout seeds derive from it). ``seed`` None keeps file
    order (validation); otherwise each epoch is a permutation drawn from ``(seed, epoch)``.
    """

    def __init__(self, pool: PromptPool, length: int, width: int, pad_id: int, seed: Optional[int]) -> None:
        self.pool, self.length, self.width, self.pad_id, self.seed = pool, length, width, pad_id, seed
        self._epoch: Tuple[int, Optional[np.ndarray]] = (-1, None)  # the last epoch's permutation

    def __len__(self) -> int:
        return self.length

    def example(self, k: int) -> int:
        """The pool index of sample ``k``."""
        epoch, offset = divmod(k, len(self.pool))
        if self.seed is None:
            return offset
        if self._epoch[0] != epoch:
            self._epoch = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.pool)))
        return int(self._epoch[1][offset])

    def __getitem__(self, k: int) -> Dict[str, torch.Tensor]:
        index = self.example(k)
        ids = self.pool.prompt_ids[index]
        row = torch.full((self.width,), self.pad_id, dtype=torch.long)
        row[: len(ids)] = torch.as_tensor(ids, dtype=torch.long)
        return {"prompt_ids": row, "prompt_length": torch.tensor(len(ids)), "example": torch.tensor(index),
                "position": torch.tensor(k)}


def stop_token_ids(tokenizer: QwenTokenizer) -> Tuple[int, ...]:
    """Tokens that end a completion: ``<|im_end|>`` (the end of the assistant turn) and the EOD."""
    return tokenizer.token_id(IM_END), tokenizer.eod


def _files(entries: Sequence[DataBlendEntry], setting: str) -> List[str]:
    if not entries:
        raise InputError(f"{setting} is empty; list prompt files as [{{path: ..., weight: 1.0}}] (see conf/data/)")
    for i, entry in enumerate(entries):
        if entry.weight != 1.0:
            raise InputError(f"{setting}[{i}].weight={entry.weight}: prompt files are concatenated, not blended by "
                             "weight; set weight: 1.0 (list a file twice to sample it twice as often)")
    return [entry.path for entry in entries]


def _split(examples: List[PromptExample], split: str) -> Tuple[List[PromptExample], List[PromptExample]]:
    """The train and validation ranges of ``examples`` by ``data.split`` (megatron's rounding)."""
    weights = parse_and_normalize_split(split)
    bounds = np.cumsum([0] + [int(round(w * len(examples))) for w in weights])
    bounds[-1] = len(examples)
    return examples[bounds[0]:bounds[1]], examples[bounds[1]:bounds[2]]


def _pool(examples: List[PromptExample], tokenizer: QwenTokenizer, cfg: Config, setting: str) -> PromptPool:
    """Tokenized prompts, each checked to leave room for ``stage.max_new_tokens`` in a training row."""
    pool = PromptPool(tokenize_prompts(examples, tokenizer), [e.answer for e in examples])
    longest = max(range(len(pool)), key=lambda i: len(pool.prompt_ids[i]))
    room = cfg.train.seq_length + 1 - cfg.stage.max_new_tokens  # a row holds prompt + completion - 1 tokens
    if len(pool.prompt_ids[longest]) > room:
        raise InputError(f"{setting}: prompt {longest} ({examples[longest].prompt[-1]['content'][:40]!r}...) has "
                         f"{len(pool.prompt_ids[longest])} tokens; with stage.max_new_tokens={cfg.stage.max_new_tokens}"
                         f" prompts may have at most {room} (train.seq_length={cfg.train.seq_length}); raise "
                         "train.seq_length, lower stage.max_new_tokens or shorten the prompt")
    return pool


def build_prompt_datasets(cfg: Config, train_samples: int,
                          valid_samples: int) -> Tuple[PromptDataset, Optional[PromptDataset]]:
    """Train and validation prompt datasets of ``train_samples`` / ``valid_samples`` samples
    (validation None when it has no prompt or no sample is asked for).

    Raises:
        InputError / TokenizerError: unreadable or bad prompt files (one line, naming the file and line).
    """
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise InputError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size="
                         f"{cfg.model.vocab_size}; use a model whose embedding covers the tokenizer")
    skip = bool((d.extra or {}).get("skip_bad_lines", False))
    train_examples = load_prompts(_files(d.blend, "data.blend"), skip).examples
    if d.valid_blend is None:
        train_examples, valid_examples = _split(train_examples, d.split)
    else:
        valid_examples = load_prompts(_files(d.valid_blend, "data.valid_blend"), skip).examples
    if not train_examples:
        raise InputError(f"data.split={d.split!r} leaves no training prompt; give training a share")
    width, pad = cfg.train.seq_length, tokenizer.eod
    train = PromptDataset(_pool(train_examples, tokenizer, cfg, "data.blend"), train_samples, width, pad,
                          cfg.train.seed)
    if not valid_examples or valid_samples <= 0:
        return train, None
    return train, PromptDataset(_pool(valid_examples, tokenizer, cfg, "validation prompts"), valid_samples, width,
                                pad, None)
