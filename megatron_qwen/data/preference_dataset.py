"""Preference-pair samples from pre-tokenized pairs (tokens + loss-mask companion).

A ``PreferenceDataset`` is a megatron ``MegatronDataset``, so ``BlendedMegatronDatasetBuilder``
gives preference data the same blends, train/valid/test splits (by pair) and seeded order as
pretraining and SFT. On disk (``tools/preprocess_data.py --preference``) a pair is one
document of two sequences, chosen then rejected, with a uint8 loss-mask companion.

A sample is one pair as two rows of ``seq_length`` positions: ``tokens``, ``labels`` and
``loss_mask`` of shape [2, s] (row 0 chosen, row 1 rejected; inputs ``t[:-1]``, labels
``t[1:]``, mask ``m[1:]``, padding after the sequence with no loss). Keeping both rows in one
sample keeps chosen and rejected in the same micro-batch and pipeline schedule step. When
reference log-probs were precomputed (:meth:`PreferenceDataset.set_reference`) a sample also
holds ``ref_logps`` [2].

Truncation: see :mod:`megatron_qwen.data.preference`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Dict, List, Optional

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
class PreferenceDatasetConfig(BlendedMegatronDatasetConfig):
    """megatron's dataset config plus the padding id."""

    pad_token_id: int = EOD_TOKEN_ID  # filler after a sequence (loss-masked)


class PreferenceLowLevelDataset:
    """Pairs on disk: two sequences (chosen, rejected) per document, and their loss masks."""

    def __init__(self, prefix: str) -> None:
        self.path_prefix = prefix
        self.tokens = IndexedDataset(prefix)
        self.masks = IndexedDataset(prefix + LOSS_MASK_SUFFIX)
        if not np.array_equal(self.tokens.sequence_lengths, self.masks.sequence_lengths):
            raise ValueError(f"{prefix}{LOSS_MASK_SUFFIX} does not match {prefix}; "
                             f"re-run tools/preprocess_data.py --preference to rebuild both")
        pairs = len(self.tokens) // 2
        if not np.array_equal(self.tokens.document_indices, np.arange(0, 2 * pairs + 1, 2)):
            raise ValueError(f"{prefix} does not hold preference pairs (two sequences per document); "
                             f"create it with tools/preprocess_data.py --preference")

    def __len__(self) -> int:
        return len(self.tokens) // 2

    def lengths(self, pairs: np.ndarray) -> np.ndarray:
        """Token counts [n, 2] (chosen, rejected) of ``pairs``."""
        return self.tokens.sequence_lengths.reshape(-1, 2)[pairs]

    def get(self, pair: int, side: int, length: int):
        """The first ``length`` tokens and mask of side 0 (chosen) or 1 (rejected) of ``pair``."""
        return self.tokens.get(2 * pair + side, 0, length), self.masks.get(2 * pair + side, 0, length)


class PreferenceDataset(MegatronDataset):
    """Pairs of one split in a seeded order, one pair (two rows) per sample."""

    def __init__(self, dataset: PreferenceLowLevelDataset, dataset_path: Optional[str], indices: np.ndarray,
                 num_samples: Optional[int], index_split: Split, config: PreferenceDatasetConfig) -> None:
        super().__init__(dataset, dataset_path, indices, num_samples, index_split, config)
        self.limit = config.sequence_length + 1  # tokens kept per side (truncation)
        self.pairs = self._usable(indices)
        self.order = self._plan(num_samples)  # sample -> position in self.pairs
        self.reference: Optional[np.ndarray] = None  # [len(self.pairs), 2] reference log-probs

    @staticmethod
    def numel_low_level_dataset(low_level_dataset: PreferenceLowLevelDataset) -> int:
        """Number of pairs (the unit of the train/valid/test split)."""
        return len(low_level_dataset)

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: PreferenceDatasetConfig) -> PreferenceLowLevelDataset:
        """Opens ``dataset_path`` and its loss-mask companion."""
        return PreferenceLowLevelDataset(dataset_path)

    @staticmethod
    def _key_config_attributes() -> List[str]:
        return MegatronDataset._key_config_attributes() + ["pad_token_id"]

    def _has_target(self, pair: int, side: int, length: int) -> bool:
        return length >= 2 and bool(self.dataset.masks.get(2 * pair + side, 1, length - 1).any())

    def _usable(self, indices: np.ndarray) -> np.ndarray:
        """Pairs whose both sides keep a response token after truncation (others are dropped)."""
        lengths = np.minimum(self.dataset.lengths(indices), self.limit)
        keep = [p for p, (nc, nr) in zip(indices.tolist(), lengths.tolist())
                if self._has_target(p, 0, nc) and self._has_target(p, 1, nr)]
        truncated = int((self.dataset.lengths(indices) > self.limit).any(axis=1).sum())
        if truncated or len(keep) < len(indices):
            log.warning("%s (%s): %d of %d pairs exceed %d tokens and have their responses cut; %d of those are "
                        "left without a response token and dropped", self.dataset_path, self.index_split.name,
                        truncated, len(indices), self.limit, len(indices) - len(keep))
        if not keep:
            raise ValueError(f"{self.dataset_path}: no usable pair in the {self.index_split.name} split; "
                             f"give it more data, a longer train.seq_length or another data.split")
        return np.asarray(keep, dtype=np.int64)

    def _plan(self, num_samples: Optional[int]) -> np.ndarray:
        """Positions into ``self.pairs``, one seeded permutation per epoch, until ``num_samples``."""
        epochs = 1 if num_samples is None else max(1, -(-num_samples // len(self.pairs)))
        return np.concatenate([np.random.RandomState(self.config.random_seed + epoch).permutation(len(self.pairs))
                               for epoch in range(epochs)])

    def set_reference(self, logps: np.ndarray) -> None:
        """Precomputed reference log-probs [len(self.pairs), 2]; samples then carry ``ref_logps``."""
        assert logps.shape == (len(self.pairs), 2), (logps.shape, len(self.pairs))
        self.reference = logps.astype(np.float32)

    def __len__(self) -> int:
        return len(self.order)

    def pair_sample(self, position: int) -> Dict[str, torch.Tensor]:
        """Rows [2, s] of the pair at ``position`` in ``self.pairs`` (no reference log-probs)."""
        s, pair = self.config.sequence_length, int(self.pairs[position])
        tokens = np.full((2, s), self.config.pad_token_id, dtype=np.int64)
        labels = np.full((2, s), self.config.pad_token_id, dtype=np.int64)
        loss_mask = np.zeros((2, s), dtype=np.float32)
        for side, length in enumerate(np.minimum(self.dataset.lengths(np.asarray([pair]))[0], self.limit)):
            ids, mask = self.dataset.get(pair, side, int(length))
            tokens[side, :length - 1], labels[side, :length - 1], loss_mask[side, :length - 1] = \
                ids[:-1], ids[1:], mask[1:]
        return {"tokens": torch.from_numpy(tokens), "labels": torch.from_numpy(labels),
                "loss_mask": torch.from_numpy(loss_mask)}

    def __getitem__(self, idx: int) -> Dict[str, torch.Tensor]:
        position = int(self.order[idx])
        sample = self.pair_sample(position)
        if self.reference is not None:
            sample["ref_logps"] = torch.from_numpy(self.reference[position])
        return sample
