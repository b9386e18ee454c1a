"""GRPO rollouts: prompt micro-batches -> sampled groups -> scored training micro-batches.

A rollout micro-batch holds ``b`` prompts' groups of ``G`` completions packed end to end in one
row (THD, no padding; :func:`~megatron_qwen.generation.batch.packed_rows`): ``tokens``, ``labels``,
``loss_mask`` (on the completion's labels), ``position_ids`` [1, t] and ``cu_seqlens`` [1, b*G + 1];
and per-completion fields [b, G]: ``advantages`` (training only), ``reward`` (the weighted
total), ``accuracy`` (the first configured reward reaching 1), ``rewards/<name>`` (each reward
unweighted) and ``lengths`` (the row's tokens, prompt + completion - 1, without filler). ``b`` is
``train.micro_batch_size``, or with ``stage.max_tokens_per_microbatch`` as many whole groups as
fit that many tokens (verl's dynamic batch size): the number of micro-batches of a step then
varies, the loss normalization does not (a sum and a count over the global batch).

Seeds: completion ``j`` of the prompt at position ``k`` of its split (the dataset sample index;
for training a function of ``train.seed``, the step and the micro-batch slot,
:mod:`megatron_qwen.data.prompt_dataset`) is sampled with its own seed derived from
``(train.seed, split, k, j)``. A completion therefore does not depend on the data-parallel
layout, on which other prompts share its batch, or on whether the run was resumed; and every
validation samples the same random numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from megatron_qwen.data.prompt_dataset import PromptPool
from megatron_qwen.data.tokenizer import QwenTokenizer
from megatron_qwen.generation.batch import packed_rows
from megatron_qwen.generation.engine import RolloutEngine, Rollouts, SamplingParams
from megatron_qwen.training.stage import Batch
from megatron_qwen.training.stages.grpo.rewards import RewardSpec, score

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


def group_spans(lengths: Sequence[int], group: int, groups: Sequence[int], prompts_per_batch: int,
                max_tokens: Optional[int]) -> List[List[int]]:
    """The groups of each micro-batch, in order: ``prompts_per_batch`` at a time, or with
    ``max_tokens`` next-fit while the groups' rows (``lengths``, G consecutive per group) fit it."""
    spans: List[List[int]] = []
    used = 0
    for g in groups:
        size = sum(lengths[g * group:(g + 1) * group])
        if spans and (used + size <= max_tokens if max_tokens else len(spans[-1]) < prompts_per_batch):
            spans[-1].append(g)
            used += size
        else:
            spans.append([g])
            used = size
    return spans


def micro_batches(rollouts: Rollouts, fields: Dict[str, torch.Tensor], group: int, groups: Sequence[int],
                  prompts_per_batch: int, max_tokens: Optional[int], seq_length: int, multiple: int = 1,
                  pad_id: int = 0) -> List[Batch]:
    """Packed rollout micro-batches of the groups ``groups`` (one global batch's share of this rank)
    and their ``fields`` [b, G] (:func:`group_spans` decides which groups share a micro-batch);
    each row's length a multiple of ``multiple`` (:func:`~megatron_qwen.generation.batch.packed_rows`)."""
    lengths = [len(p) + len(c) - 1 for p, c in zip(rollouts.prompt_ids, rollouts.completion_ids)]
    batches = []
    for span in group_spans(lengths, group, groups, prompts_per_batch, max_tokens):
        rows = [g * group + j for g in span for j in range(group)]
        batch = packed_rows(rollouts, rows, seq_length, multiple, pad_id)
        batch.update({key: value[rows].view(len(span), group) for key, value in fields.items()})
        batch["lengths"] = torch.tensor([lengths[r] for r in rows]).view(len(span), group)
        batches.append(batch)
    return batches


def trained_tokens(batches: Sequence[Batch]) -> int:
    """Prompt and completion tokens of the packed rows (the filler rounding a row up to a multiple
    of TP under sequence parallel left out): the tokens a training pass learns from."""
    return sum(int(batch["lengths"].sum()) for batch in batches)
