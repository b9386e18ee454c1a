"""GRPO rollouts: prompt micro-batches -> sampled groups -> scored training micro-batches.

A rollout micro-batch holds ``b`` prompts' groups of ``G`` completions as rows [b, G, s]
(``tokens``, ``labels``, ``loss_mask`` from :func:`~megatron_qwen.generation.batch.rollout_batch`:
prompt + completion from position 0, the mask on the completion's tokens) and per-completion
fields [b, G]: ``advantages`` (training only), ``reward`` (the weighted total), ``accuracy``
(the first configured reward reaching 1) and ``rewards/<name>`` (each reward unweighted).

Seeds: completion ``j`` of the prompt at position ``k`` of its split (the dataset sample index;
for training a function of ``train.seed``, the step and the micro-batch slot,
:mod:`megatron_qwen.data.prompt_dataset`) is sampled with its own seed derived from
``(train.seed, split, k, j)``. A completion therefore does not depend on the data-parallel
layout, on which other prompts share its batch, or on whether the run was resumed; and every
validation samples the same random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Sequence

import numpy as np
import torch

from megatron_qwen.data.prompt_dataset import PromptPool
from megatron_qwen.data.tokenizer import QwenTokenizer
from megatron_qwen.generation.batch import rollout_batch
from megatron_qwen.generation.engine import RolloutEngine, Rollouts, SamplingParams
from megatron_qwen.training.rewards import RewardSpec, score
from megatron_qwen.training.stage import Batch

ROW_KEYS = ("tokens", "labels", "loss_mask")


TRAIN_SPLIT, VALID_SPLIT = 0, 1


def row_seed(seed: int, split: int, position: int, completion: int) -> int:
    """The sampler seed of completion ``completion`` of the prompt at ``position`` of ``split``
    (numpy's SeedSequence mixes the four into independent 64-bit streams)."""
    return int(np.random.SeedSequence([seed, split, position, completion]).generate_state(1, np.uint64)[0])


@dataclass
class Prompts:
    """The prompts of some micro-batches, in order: token ids, reference answers, run positions."""

    ids: List[List[int]]
    answers: List[str]
    positions: List[int]


def gather_prompts(batches: Sequence[Batch], pool: PromptPool) -> Prompts:
    """The prompts of prompt micro-batches (:class:`~megatron_qwen.data.prompt_dataset.PromptDataset` samples)."""
    prompts = Prompts([], [], [])
    for batch in batches:
        for ids, length, example, position in zip(batch["prompt_ids"], batch["prompt_length"].tolist(),
                                                  batch["example"].tolist(), batch["position"].tolist()):
            prompts.ids.append(ids[:length].tolist())
            prompts.answers.append(pool.answers[example])
            prompts.positions.append(position)
    return prompts


def sample_groups(engine: RolloutEngine, prompts: Prompts, group: int, params: SamplingParams, seed: int,
                  split: int) -> Rollouts:
    """``group`` completions of every prompt, consecutive, each with its :func:`row_seed`."""
    ids = [p for p in prompts.ids for _ in range(group)]
    seeds = [row_seed(seed, split, k, j) for k in prompts.positions for j in range(group)]
    return engine.generate(ids, params, seeds)


def completion_texts(rollouts: Rollouts, tokenizer: QwenTokenizer) -> List[str]:
    """Each completion's text without its closing stop token (what the rewards read)."""
    return [tokenizer.decode(ids[:-1] if stopped else ids) for ids, stopped in
            zip(rollouts.completion_ids, rollouts.stopped)]


def reward_fields(rollouts: Rollouts, prompts: Prompts, group: int, tokenizer: QwenTokenizer,
                  specs: Sequence[RewardSpec]) -> Dict[str, torch.Tensor]:
    """``reward``, ``accuracy`` and ``rewards/<name>`` of every completion [n]."""
    answers = [a for a in prompts.answers for _ in range(group)]
    total, terms = score(completion_texts(rollouts, tokenizer), answers, specs)
    fields = {"reward": total, "accuracy": (terms[specs[0].name] >= 1).float()}
    fields.update({f"rewards/{name}": value for name, value in terms.items()})
    return fields


def micro_batches(rollouts: Rollouts, fields: Dict[str, torch.Tensor], group: int, micro_batch_size: int,
                  seq_length: int, pad_id: int) -> List[Batch]:
    """Rollout micro-batches of ``micro_batch_size`` prompts: rows [b, G, s] and ``fields`` [b, G]."""
    rows = rollout_batch(rollouts, seq_length, pad_id)
    per_batch = micro_batch_size * group
    batches = []
    for start in range(0, len(rollouts.completion_ids), per_batch):
        part = slice(start, start + per_batch)
        batch = {key: rows[key][part].view(micro_batch_size, group, seq_length) for key in ROW_KEYS}
        batch.update({key: value[part].view(micro_batch_size, group) for key, value in fields.items()})
        batches.append(batch)
    return batches


def trained_tokens(batches: Sequence[Batch]) -> int:
    """Prompt and completion tokens of the rows (padding excluded): the tokens a training pass reads."""
    total = 0
    for batch in batches:
        mask = batch["loss_mask"]  # [b, G, s]: the completion's labels; the prompt precedes them
        last = mask.shape[-1] - 1 - mask.flip(-1).float().argmax(-1)  # the last completion label's position
        total += int((last + 1).sum())
    return total
