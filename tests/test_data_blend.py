"""Blends of indexed datasets: weights, determinism, resume, DP sharding, per-split blends."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.data.batches import MicroBatchIterator
from megatron_qwen.data.datasets import build_datasets, dataset_shares
from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
from megatron_qwen.data.tokenizer import load_tokenizer
from tests.data_support import destroy_single_rank, init_single_rank, tiny_config, write_jsonl

SEQ = 32


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    """Two indexed datasets with disjoint vocabularies: 'alpha' words and 'beta' digits."""
    root = tmp_path_factory.mktemp("blend")
    texts = {"alpha": [" ".join(["apple banana cherry"] * (5 + i % 7)) for i in range(150)],
             "beta": [" ".join(str(7 * i + j) for j in range(20 + i % 11)) for i in range(150)]}
    prefixes = {}
    for name, docs in texts.items():
        write_jsonl(root / f"{name}.jsonl", [{"text": t} for t in docs])
        preprocess([str(root / f"{name}.jsonl")], str(root / name), PreprocessOptions(progress=False))
        prefixes[name] = str(root / name)
    init_single_rank(tiny_config())
    yield root, prefixes
    destroy_single_rank()


def _cfg(root, prefixes, seed=1234, cache="cache", **data):
    fields = dict(type="indexed", split="90,5,5", cache_dir=str(root / cache),
                  blend=[DataBlendEntry(prefixes["alpha"], 0.7), DataBlendEntry(prefixes["beta"], 0.3)])
    fields.update(data)
    cfg = tiny_config(**fields)
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, seed=seed, seq_length=SEQ))


def _tokens(dataset, n):
    return np.stack([dataset[i]["tokens"].numpy() for i in range(n)])


def test_blend_shares_follow_weights(corpora):
    root, prefixes = corpora
    train, valid = build_datasets(_cfg(root, prefixes), 10_000, 64)
    ids = np.array([train[i]["dataset_id"] for i in range(10_000)])
    assert abs((ids == 0).mean() - 0.7) < 0.02 and abs((ids == 1).mean() - 0.3) < 0.02
    assert [n for _, n in dataset_shares(train)] == [int((ids == 0).sum()), int((ids == 1).sum())]
    # dataset_id tells the truth: alpha samples hold only alpha tokens.
    alpha_vocab = set(load_tokenizer().encode("apple banana cherry apple")) | {load_tokenizer().eod}
    first_alpha = int(np.flatnonzero(ids == 0)[0])
    assert set(train[first_alpha]["tokens"].tolist()) <= alpha_vocab
    assert len(valid) >= 64


def test_same_seed_same_order_other_seed_differs(corpora):
    root, prefixes = corpora
    first, _ = build_datasets(_cfg(root, prefixes, cache="c1"), 2_000, 16)
    again, _ = build_datasets(_cfg(root, prefixes, cache="c2"), 2_000, 16)  # fresh index cache
    other, _ = build_datasets(_cfg(root, prefixes, seed=99, cache="c3"), 2_000, 16)
    assert np.array_equal(_tokens(first, 200), _tokens(again, 200))
    assert not np.array_equal(_tokens(first, 200), _tokens(other, 200))


def test_resume_from_consumed_samples_continues_the_order(corpora):
    root, prefixes = corpora
    cfg, mbs, gbs = _cfg(root, prefixes), 2, 8
    train, _ = build_datasets(cfg, 400, 16)
    straight = [b["tokens"] for b, _ in zip(MicroBatchIterator(train, 0, mbs, 0, 1), range(40))]
    resumed_ds, _ = build_datasets(cfg, 400, 16)  # a restarted job rebuilds from the cache
    consumed = 5 * gbs
    resumed = [b["tokens"] for b, _ in zip(MicroBatchIterator(resumed_ds, consumed, mbs, 0, 1), range(20))]
    assert all(torch.equal(a, b) for a, b in zip(straight[consumed // mbs:], resumed))


def test_data_parallel_ranks_shard_each_global_batch(corpora):
    root, prefixes = corpora
    train, _ = build_datasets(_cfg(root, prefixes), 400, 16)
    single = MicroBatchIterator(train, 0, 2, 0, 1)
    ranks = [MicroBatchIterator(train, 0, 2, r, 2) for r in range(2)]
    for _ in range(10):  # each DP micro-step covers 4 consecutive samples: rank 0 then rank 1
        expected = torch.cat([next(single)["tokens"], next(single)["tokens"]])
        assert torch.equal(torch.cat([next(it)["tokens"] for it in ranks]), expected)


def test_valid_blend_is_used_for_validation(corpora):
    root, prefixes = corpora
    cfg = _cfg(root, prefixes, valid_blend=[DataBlendEntry(prefixes["beta"], 1.0)])
    train, valid = build_datasets(cfg, 500, 40)
    assert [p for p, n in dataset_shares(valid) if n] == [prefixes["beta"]]
    assert len(dataset_shares(train)) == 2


def test_bad_blends_are_explained(corpora):
    root, prefixes = corpora
    with pytest.raises(ValueError, match=r"data.blend\[0\].path=.*nope.bin/.idx not found.*preprocess_data.py"):
        build_datasets(_cfg(root, prefixes, blend=[DataBlendEntry(str(root / "nope"), 1.0)]), 10, 2)
    with pytest.raises(ValueError, match="data.blend is empty"):
        build_datasets(_cfg(root, prefixes, blend=[]), 10, 2)
    with pytest.raises(ValueError, match="weight=0.0 must be > 0"):
        build_datasets(_cfg(root, prefixes, blend=[DataBlendEntry(prefixes["beta"], 0.0)]), 10, 2)
    small = _cfg(root, prefixes)
    small = dataclasses.replace(small, model=dataclasses.replace(small.model, vocab_size=256))
    with pytest.raises(ValueError, match="model.vocab_size=256"):
        build_datasets(small, 10, 2)
    sft_stage = _cfg(root, prefixes)
    sft_stage = dataclasses.replace(sft_stage, stage=dataclasses.replace(sft_stage.stage, name="sft"))
    with pytest.raises(ValueError, match="stage=sft needs SFT data"):
        build_datasets(sft_stage, 10, 2)
