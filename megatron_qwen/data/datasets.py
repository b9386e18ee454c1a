"""Dataset construction through megatron-core's ``BlendedMegatronDatasetBuilder``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDatasetConfig, MockGPTDataset

from megatron_qwen.config.schema import Config

EOD_TOKEN_ID = 151643  # <|endoftext|>, Qwen2.5's end-of-document token


@dataclass
class _VocabInfo:
    """The two tokenizer facts megatron's GPTDataset needs (mock data has no real tokenizer)."""

    vocab_size: int
    eod: int
    pad: int = -1

    @property
    def unique_identifiers(self) -> dict:
        # Part of megatron's dataset cache key.
        return {"class": "_VocabInfo", "vocab_size": self.vocab_size, "eod": self.eod}


def _gpt_config(cfg: Config, tokenizer, mock: bool = False) -> GPTDatasetConfig:
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        tokenizer=tokenizer,
        split=cfg.data.split,
        path_to_cache=cfg.data.cache_dir,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no materialized mask
    )
    config.mock = mock  # GPTDatasetConfig.mock is init=False
    return config


def build_datasets(cfg: Config, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
    """Train and validation datasets sized for ``train_samples`` / ``valid_samples``."""
    if cfg.data.type != "mock":
        raise ValueError(f"data.type={cfg.data.type!r} is not supported by this build; use data=mock")
    # Mock documents count 1, 2, 3, ... modulo the vocab and end with the EOD id.
    vocab = _VocabInfo(vocab_size=cfg.model.vocab_size, eod=cfg.model.vocab_size - 1)
    gpt_config = _gpt_config(cfg, vocab, mock=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(
        MockGPTDataset, [train_samples, valid_samples, 0], lambda: True, gpt_config
    ).build()
    return train, valid
