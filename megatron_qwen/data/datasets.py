"""Dataset construction through megatron-core's ``BlendedMegatronDatasetBuilder``.

``data.type`` picks the source:

- ``mock``: megatron's learnable mock dataset (no files);
- ``indexed``: ``data.blend`` entries are indexed-dataset prefixes from tools/preprocess_data.py;
- ``embedded``: entries name domains of the built-in corpus (:mod:`megatron_qwen.data.embedded`);
- ``sft``: entries are pre-tokenized conversation prefixes (``--chat``) or raw
  ``.jsonl``/``.jsonl.gz``/``.parquet`` conversation files, tokenized once into the cache;
- ``preference``: the same for preference pairs (``--preference``; stage=dpo).

Train and validation come from ``data.blend`` split by ``data.split`` (by document), or, when
``data.valid_blend`` is set, train uses all of ``data.blend`` and validation all of
``data.valid_blend``. Sample order is a function of ``train.seed`` only; index files are
cached under ``<cache root>/indices`` (see :func:`megatron_qwen.data.cache.cache_root`).
Relative paths are relative to the working directory.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
from megatron.core.datasets.blended_dataset import BlendedDataset
from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.blended_megatron_dataset_config import (BlendedMegatronDatasetConfig,
                                                                    convert_split_vector_to_split_matrix,
                                                                    parse_and_normalize_split)
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig, MockGPTDataset
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.config.long_context import packed_pad_multiple
from megatron_qwen.config.schema import Config, DataBlendEntry
from megatron_qwen.data.cache import build_once, cache_root, content_key
from megatron_qwen.data.embedded import DOMAINS as EMBEDDED_DOMAINS, ensure_embedded_domain
from megatron_qwen.data.preference_dataset import PreferenceDataset, PreferenceDatasetConfig
from megatron_qwen.data.preprocess import LOSS_MASK_SUFFIX, PreprocessOptions, preprocess
from megatron_qwen.data.records import InputError
from megatron_qwen.data.sft_dataset import PackedSFTDataset, SFTDatasetConfig
from megatron_qwen.data.tokenizer import QwenTokenizer, load_tokenizer

log = logging.getLogger(__name__)

DATA_TYPES = ("mock", "indexed", "embedded", "sft", "preference")
MASKED_TYPES = {"sft": "--chat", "preference": "--preference"}  # data with a loss-mask companion
RAW_SUFFIXES = (".jsonl", ".jsonl.gz", ".json", ".parquet")
Blend = Tuple[List[str], List[float]]
SPLIT_NAMES = ("train", "validation", "test")
Bounds = Optional[Tuple[float, float]]  # a split's share of each dataset's documents, None: not built


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


def _gpt_config(cfg: Config, tokenizer, mock: bool = False, **blend_kwargs) -> GPTDatasetConfig:
    config = GPTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        tokenizer=tokenizer,
        split=None if "blend_per_split" in blend_kwargs else cfg.data.split,
        path_to_cache=cfg.data.cache_dir if mock else str(cache_root(cfg.data.cache_dir) / "indices"),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no materialized mask
        **blend_kwargs,
    )
    config.mock = mock  # GPTDatasetConfig.mock is init=False
    return config


def _build_mock(cfg: Config, sizes: List[int]) -> Tuple[object, Optional[object]]:
    # Mock documents count 1, 2, 3, ... modulo the vocab and end with the EOD id.
    vocab = _VocabInfo(vocab_size=cfg.model.vocab_size, eod=cfg.model.vocab_size - 1)
    gpt_config = _gpt_config(cfg, vocab, mock=True)
    train, valid, _ = BlendedMegatronDatasetBuilder(MockGPTDataset, sizes, lambda: True, gpt_config).build()
    return train, valid


def _require_prefix(prefix: str, setting: str, flag: Optional[str] = None) -> str:
    for candidate in (prefix, prefix + LOSS_MASK_SUFFIX) if flag else (prefix,):
        if not IndexedDataset.exists(candidate):
            raise ValueError(f"{setting}: {candidate}.bin/.idx not found; create it with "
                             f"tools/preprocess_data.py{' ' + flag if flag else ''} or fix the path "
                             f"(relative paths start at the working directory)")
    return prefix


def _tokenized_conversations(path: str, cfg: Config, tokenizer: QwenTokenizer, setting: str) -> str:
    """Prefix of the cached tokenization of a raw conversation or preference file (built on first use)."""
    source = Path(path)
    if not source.is_file():
        raise ValueError(f"{setting}: {path} not found; fix the path (relative paths start at the working directory)")
    stat = source.stat()
    key = content_key({"path": str(source.resolve()), "size": stat.st_size, "mtime": stat.st_mtime_ns,
                       "tokenizer": tokenizer.digest})
    kind = cfg.data.type
    options = PreprocessOptions(tokenizer=cfg.data.tokenizer, chat=kind == "sft", preference=kind == "preference",
                                progress=False)
    name = source.name.split(".")[0]  # the prefix keeps the file's name for the logs
    directory = build_once(cache_root(cfg.data.cache_dir) / kind / key,
                           lambda tmp: log.info("%s: %s", path, preprocess([path], str(tmp / name), options).summary()))
    return str(directory / name)


def _resolve_path(path: str, cfg: Config, tokenizer: QwenTokenizer, setting: str) -> str:
    kind = cfg.data.type
    if kind == "embedded":
        if path not in EMBEDDED_DOMAINS:
            raise ValueError(f"{setting}: unknown embedded domain {path!r}; choose from {', '.join(EMBEDDED_DOMAINS)}")
        return ensure_embedded_domain(cache_root(cfg.data.cache_dir), path, cfg.data.tokenizer)
    if kind in MASKED_TYPES and path.endswith(RAW_SUFFIXES):
        return _tokenized_conversations(path, cfg, tokenizer, setting)
    return _require_prefix(path, setting, MASKED_TYPES.get(kind))


def _blend(entries: Sequence[DataBlendEntry], cfg: Config, tokenizer: QwenTokenizer, name: str) -> Blend:
    """(prefixes, weights) of a blend, every path checked or built."""
    if not entries:
        raise ValueError(f"{name} is empty; list datasets as [{{path: ..., weight: ...}}] (see conf/data/)")
    paths, weights = [], []
    for i, entry in enumerate(entries):
        if entry.weight <= 0:
            raise ValueError(f"{name}[{i}].weight={entry.weight} must be > 0")
        paths.append(_resolve_path(entry.path, cfg, tokenizer, f"{name}[{i}].path={entry.path}"))
        weights.append(float(entry.weight))
    return paths, weights


def _blend_kwargs(cfg: Config, tokenizer: QwenTokenizer) -> dict:
    train = _blend(cfg.data.blend, cfg, tokenizer, "data.blend")
    if cfg.data.valid_blend is None:
        return {"blend": train}
    valid = _blend(cfg.data.valid_blend, cfg, tokenizer, "data.valid_blend")
    return {"blend_per_split": [train, valid, None]}


def _check(cfg: Config, tokenizer: QwenTokenizer) -> None:
    if cfg.data.type not in DATA_TYPES:
        raise ValueError(f"data.type={cfg.data.type!r} must be one of {DATA_TYPES}")
    if cfg.stage.name == "sft" and cfg.data.type != "sft":
        raise ValueError(f"stage=sft needs SFT data, but data.type={cfg.data.type}; pick one with data=sft_example "
                         f"(or another conf/data set of type sft)")
    if tokenizer.vocab_size > cfg.model.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} tokens but model.vocab_size={cfg.model.vocab_size}; "
                         f"use a model whose embedding covers the tokenizer (Qwen2.5: 151936), or data=mock for a "
                         f"byte-sized test model")
    if cfg.data.type == "sft" and cfg.parallel.pp > 1 and cfg.train.micro_batch_size > 1:
        raise ValueError(f"packed SFT at parallel.pp={cfg.parallel.pp} needs train.micro_batch_size=1 "
                         f"(packed micro-batches are flattened into one row); got {cfg.train.micro_batch_size}")


def _preference_config(cfg: Config, tokenizer: QwenTokenizer, blend_kwargs: dict) -> PreferenceDatasetConfig:
    return PreferenceDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        tokenizer=tokenizer,
        split=None if "blend_per_split" in blend_kwargs else cfg.data.split,
        path_to_cache=str(cache_root(cfg.data.cache_dir) / "indices"),
        pad_token_id=tokenizer.eod,
        **blend_kwargs,
    )


def _sft_config(cfg: Config, tokenizer: QwenTokenizer, blend_kwargs: dict) -> SFTDatasetConfig:
    extra = cfg.data.extra or {}
    return SFTDatasetConfig(
        random_seed=cfg.train.seed,
        sequence_length=cfg.train.seq_length,
        tokenizer=tokenizer,
        split=None if "blend_per_split" in blend_kwargs else cfg.data.split,
        path_to_cache=str(cache_root(cfg.data.cache_dir) / "indices"),
        pack=bool(extra.get("pack", True)),
        pad_token_id=tokenizer.eod,
        pad_multiple=packed_pad_multiple(cfg),
        **blend_kwargs,
    )


def dataset_shares(dataset) -> List[Tuple[str, int]]:
    """(dataset path, samples) for each dataset contributing to a split."""
    if isinstance(dataset, BlendedDataset):
        counts = np.bincount(dataset.dataset_index, minlength=len(dataset.datasets))
        return [(d.dataset_path, int(n)) for d, n in zip(dataset.datasets, counts)]
    return [(dataset.dataset_path, len(dataset))]


def valid_domains(cfg: Config) -> List[str]:
    """Names of the validation split's datasets in blend order (a blended sample's ``dataset_id``
    indexes it): ``data.valid_blend``'s when set, else ``data.blend``'s; none for mock data."""
    if cfg.data.type == "mock":
        return []
    return [entry.domain for entry in (cfg.data.valid_blend if cfg.data.valid_blend is not None else cfg.data.blend)]


def domain_samples(dataset, num_samples: int) -> List[int]:
    """Samples each dataset of a blend contributes to the first ``num_samples`` of ``dataset`` (blend order)."""
    if not isinstance(dataset, BlendedDataset):
        return [min(num_samples, len(dataset))]
    return np.bincount(dataset.dataset_index[:num_samples], minlength=len(dataset.datasets)).tolist()


def _log_shares(split: str, dataset) -> None:
    if dataset is None or (torch.distributed.is_initialized() and torch.distributed.get_rank() != 0):
        return
    shares = dataset_shares(dataset)
    total = sum(n for _, n in shares)
    parts = ", ".join(f"{Path(path).name} {n:,} ({100 * n / max(total, 1):.1f}%)" for path, n in shares)
    log.info("%s data: %s samples: %s", split, f"{total:,}", parts)


def _build_asked_splits_only(config: BlendedMegatronDatasetConfig, sizes: List[int]) -> None:
    """Leaves out the splits asked for no sample (the test split always): megatron builds every
    split with a share of ``data.split``, also for 0 samples, and one with no document of a dataset
    never finishes (see :func:`_check_split_documents`). The other splits keep their documents."""
    if config.split_matrix is not None:
        config.split_matrix = [b if size > 0 else None for b, size in zip(config.split_matrix, sizes)]
    elif config.blend_per_split is not None:
        config.blend_per_split = [b if size > 0 else None for b, size in zip(config.blend_per_split, sizes)]


def _document_ranges(matrix: Sequence[Bounds], num_documents: int) -> List[Optional[Tuple[int, int]]]:
    """Each split's [begin, end) documents of a dataset, rounded as megatron-core 0.16.1 does
    (``BlendedMegatronDatasetBuilder._build_megatron_dataset_splits``)."""
    return [None if b is None else (int(round(b[0] * float(num_documents))), int(round(b[1] * float(num_documents))))
            for b in matrix]


def _example_split(num_documents: int, asked: Sequence[bool]) -> Optional[str]:
    """The ``train,valid,0`` split with the smallest validation share that gives each asked split
    a document of ``num_documents``, or None when none does."""
    for valid in range(1 if asked[1] else 0, 100):
        split = f"{100 - valid},{valid},0"
        ranges = _document_ranges(convert_split_vector_to_split_matrix(parse_and_normalize_split(split)),
                                  num_documents)
        if all(r is not None and r[1] > r[0] for r, a in zip(ranges, asked) if a):
            return split
    return None


def _split_fix(cfg: Config, split: int, smallest: int, asked: Sequence[bool]) -> str:
    """How to give every asked split a document when the blend's smallest dataset has ``smallest``."""
    if cfg.data.valid_blend is not None:
        return "preprocess it again from input that has documents, or take it out of the blend"
    example = _example_split(smallest, asked)
    fix = "use larger datasets, or " + (f"a data.split that gives each split >= 1 document, e.g. data.split={example}"
                                        if example else "data.valid_blend for validation")
    return fix + (", or turn validation off with train.eval_iters=0" if split == 1 else "")


def _check_split_shares(cfg: Config, config: BlendedMegatronDatasetConfig, sizes: List[int]) -> None:
    """Training, and validation when samples are asked of it, have a share of ``data.split``."""
    if config.split_matrix is None:  # data.valid_blend: every split is all of its own blend
        return
    if config.split_matrix[0] is None:
        raise InputError(f"data.split={cfg.data.split} gives training no share; give it one, e.g. data.split=98,1,1")
    if sizes[1] > 0 and config.split_matrix[1] is None:
        raise InputError(f"data.split={cfg.data.split} gives validation no share, but train.eval_iters="
                         f"{cfg.train.eval_iters} asks for {sizes[1]} validation samples; give it one, e.g. "
                         "data.split=95,5,0, set data.valid_blend, or turn validation off with train.eval_iters=0")


def _check_split_documents(cfg: Config, cls, config: BlendedMegatronDatasetConfig) -> None:
    """Every split that is built gets a token of every dataset of its blend; else an InputError
    names the dataset, its documents, the split and the fix.

    NOTE: megatron-core 0.16.1 would loop forever otherwise: ``GPTDataset._get_num_epochs``
    adds epochs ``while num_tokens < num_tokens_requested``, and a split without tokens of a
    dataset adds 0 per epoch while even 0 samples request 1 token (``add_extra_token_to_sequence``).
    """
    if config.split_matrix is not None:  # data.blend split by data.split
        matrix, blends = config.split_matrix, [config.blend] * len(SPLIT_NAMES)
    else:  # each split is all of its own blend
        matrix, blends = [None if b is None else (0.0, 1.0) for b in config.blend_per_split], config.blend_per_split
    asked = [b is not None for b in matrix]
    # Each dataset opened once, however many splits read it (a corpus blend lists thousands).
    paths = {path for bounds, blend in zip(matrix, blends) if bounds is not None for path in blend[0]}
    datasets = {path: cls.build_low_level_dataset(path, config) for path in paths}
    documents = {path: cls.numel_low_level_dataset(d) for path, d in datasets.items()}
    for split, (bounds, blend) in enumerate(zip(matrix, blends)):
        if bounds is None:
            continue
        for path in blend[0]:
            begin, end = _document_ranges([bounds], documents[path])[0]
            lengths = getattr(datasets[path], "sequence_lengths", None)  # tokens per document (indexed data)
            if end > begin and (lengths is None or lengths[begin:end].sum() > 0):
                continue
            given = f"data.split={cfg.data.split} gives " if config.split_matrix is not None else ""
            raise InputError(f"{given}{path} ({documents[path]} documents) no {SPLIT_NAMES[split]} "
                             f"{'document' if end == begin else 'token'}; "
                             f"{_split_fix(cfg, split, min(documents.values()), asked)}")


def build_datasets(cfg: Config, train_samples: int, valid_samples: int) -> Tuple[object, Optional[object]]:
    """Train and validation datasets sized for ``train_samples`` / ``valid_samples`` (validation
    None when no sample is asked of it).

    Logs the number of samples each dataset contributes to each split. Raises InputError, before
    megatron builds anything, when a split that is built would get no document of a dataset.
    """
    sizes = [train_samples, valid_samples, 0]
    if cfg.data.type == "mock":
        return _build_mock(cfg, sizes)
    tokenizer = load_tokenizer(cfg.data.tokenizer)
    _check(cfg, tokenizer)
    blend_kwargs = _blend_kwargs(cfg, tokenizer)
    if cfg.data.type == "sft":
        cls, config = PackedSFTDataset, _sft_config(cfg, tokenizer, blend_kwargs)
    elif cfg.data.type == "preference":
        cls, config = PreferenceDataset, _preference_config(cfg, tokenizer, blend_kwargs)
    else:
        cls, config = GPTDataset, _gpt_config(cfg, tokenizer, **blend_kwargs)
    _check_split_shares(cfg, config, sizes)
    _build_asked_splits_only(config, sizes)
    _check_split_documents(cfg, cls, config)
    train, valid, _ = BlendedMegatronDatasetBuilder(cls, sizes, lambda: True, config).build()
    _log_shares("train", train)
    _log_shares("valid", valid)
    return train, valid
