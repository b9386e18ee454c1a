"""Packed SFT samples from pre-tokenized conversations (tokens + loss-mask companion).

A ``PackedSFTDataset`` is a megatron ``MegatronDataset``, so ``BlendedMegatronDatasetBuilder``
gives SFT the same blends, train/valid/test splits (by conversation), per-split blends and
seeded determinism as pretraining.

Each sample is one sequence of ``seq_length`` positions holding whole conversations in a
seeded order, packed next-fit: a conversation of ``n`` tokens takes ``n - 1`` positions
(inputs ``t[:-1]``, labels ``t[1:]``, loss mask ``m[1:]``); the rest of the sequence is
padding with no loss. Position ids restart at 0 for every conversation and ``cu_seqlens``
marks their boundaries, so attention stays inside each conversation (a block-diagonal mask
on CPU, the THD/varlen kernels under Transformer Engine). ``cu_seqlens`` is padded to
``seq_length + 1`` entries by repeating its last value so that samples stack.

Under context parallelism each packed sub-sequence is split into ``2*cp`` chunks, so every
conversation's span is padded (loss-masked filler after its last token, which no earlier
token can see) to a multiple of ``pad_multiple``; the trailing padding segment then is one too.

With ``pack=False`` each sample holds one conversation and no ``cu_seqlens``: plain causal
attention, the padding after the conversation does not influence it.

Truncation: see :mod:`megatron_qwen.data.sft`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_megatron_dataset_config import BlendedMegatronDatasetConfig
from megatron.core.datasets.indexed_dataset import IndexedDataset
from megatron.core.datasets.megatron_dataset import MegatronDataset
from megatron.core.datasets.utils import Split

from megatron_qwen.data.preprocess import LOSS_MASK_SUFFIX
from megatron_qwen.data.tokenizer import EOD_TOKEN_ID

log = logging.getLogger(__name__)


@dataclass
class SFTDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron's dataset config plus the SFT options."""

    pack: bool = True
    pad_token_id: int = EOD_TOKEN_ID  # filler token id after the last conversation (loss-masked)
    pad_multiple: int = 1  # each packed conversation spans a multiple of this (2*cp under CP)


class SFTLowLevelDataset:
    """A pair of indexed datasets: conversation tokens and their uint8 loss masks."""

    def __init__(self, prefix: str) -> None:
        self.path_prefix = prefix
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths):
            raise ValueError(f"{prefix}{LOSS_MASK_SUFFIX} does not match {prefix}; "
                             f"re-run tools/preprocess_data.py --chat to rebuild both")

    def __len__(self) -> int:
        return len(self.tokens)

    def get(self, idx: int, length: int) -> Tuple[np.ndarray, np.ndarray]:
        """The first ``length`` tokens of conversation ``idx`` and their mask."""
        return self.tokens.get(idx, 0, length), self.masks.get(idx, 0, length)


def next_fit_packs(positions: np.ndarray, capacity: int, max_per_pack: Optional[int] = None) -> List[List[int]]:
    """Groups items (in the given order) into packs whose ``positions`` sum to at most ``capacity``."""
    packs: List[List[int]] = []
    current: List[int] = []
    used = 0
    for item, size in enumerate(positions.tolist()):
        full = max_per_pack is not None and len(current) == max_per_pack
        if current and (used + size > capacity or full):
            packs.append(current)
            current, used = [], 0
        current.append(item)
        used += size
    return packs + [current] if current else packs


class PackedSFTDataset(MegatronDataset):
    """Packed (or one-per-sample) SFT sequences over the conversations of one split."""

    def __init__(self, dataset: SFTLowLevelDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: SFTDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.limit = config.sequence_length + 1  # tokens kept per conversation (truncation)
        self.conversations = self._usable(indices)
        self.packs = self._plan(num_samples)

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: SFTLowLevelDataset) -> int:
        """Number of conversations (the unit of the train/valid/test split)."""
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: SFTDatasetConfig) -> SFTLowLevelDataset:
        """Opens ``dataset_path`` and its loss-mask companion."""
        return SFTLowLevelDataset(dataset_path)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + ["pack", "pad_token_id", "pad_multiple"]

    def _usable(self, indices: np.ndarray) -> np.ndarray:
        """Conversations that keep at least one target after truncation (others are dropped)."""
        lengths = np.minimum(self.dataset.tokens.sequence_lengths[indices], self.limit)
        keep = [i for i, n in zip(indices.tolist(), lengths.tolist())
                if n >= 2 and self.dataset.masks.get(i, 1, n - 1).any()]  # targets are m[1:n]
        dropped = len(indices) - len(keep)
        if dropped:
            log.warning("%s (%s): dropped %d of %d conversations with no assistant token within %d tokens",
                        self.dataset_path, self.index_split.name, dropped, len(indices), self.limit)
        if not keep:
            raise ValueError(f"{self.dataset_path}: no usable conversation in the {self.index_split.name} split; "
                             f"give it more data or change data.split")
        return np.asarray(keep, dtype=np.int64)

    def _plan(self, num_samples: Optional[int]) -> List[np.ndarray]:
        """Packs of conversation ids, one seeded shuffle per epoch, until ``num_samples``."""
        lengths = self._span(np.minimum(self.dataset.tokens.sequence_lengths[self.conversations], self.limit) - 1)
        per_pack = None if self.config.pack else 1
        packs: List[np.ndarray] = []
        epoch = 0
        while not packs or (num_samples is not None and len(packs) < num_samples):
            order = np.random.RandomState(self.config.random_seed + epoch).permutation(len(self.conversations))
            for pack in next_fit_packs(lengths[order], self.config.sequence_length, per_pack):
                packs.append(self.conversations[order[pack]])
            epoch += 1
        return packs

    def _span(self, positions):
        """Positions a conversation occupies in a packed sample: its own, padded up to ``pad_multiple``."""
        multiple = self.config.pad_multiple if self.config.pack else 1
        return -(-positions // multiple) * multiple

    def __len__(self) -> int:
        return len(self.packs)

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        s = self.config.sequence_length
        tokens = np.full(s, self.config.pad_token_id, dtype=np.int64)
        labels = np.full(s, self.config.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros(s, dtype=np.float32)
        position_ids = np.zeros(s, dtype=np.int64)
        bounds = [0]
        for conversation in self.packs[idx].tolist():
            ids, mask = self.dataset.get(conversation, min(self.dataset.tokens.sequence_lengths[conversation], self.limit))
            start, end = bounds[-1], bounds[-1] + len(ids) - 1
            tokens[start:end], labels[start:end], loss_mask[start:end] = ids[:-1], ids[1:], mask[1:]
            span = int(self._span(end - start))  # [end, start + span): filler, no loss
            position_ids[start:start + span] = np.arange(span)
            bounds.append(start + span)
        position_ids[bounds[-1]:] = np.arange(s - bounds[-1])  # padding: its own segment
        sample = {"tokens": tokens, "labels": labels, "loss_mask": loss_mask, "position_ids": position_ids}
        if self.config.pack:
            cu_seqlens = np.full(s + 1, s, dtype=np.int32)  # [s+1], trailing repeats = empty segments
            cu_seqlens[:len(bounds)] = bounds
            sample["cu_seqlens"] = cu_seqlens
        return {k: torch.from_numpy(v) for k, v in sample.items()}
