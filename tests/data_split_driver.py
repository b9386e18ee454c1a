"""Test driver: ``build_datasets`` for a list of ``data.split`` cases over the given indexed datasets.

Run by tests/test_data_split.py in a subprocess under a timeout: megatron-core loops forever on a
split without a document of a dataset, and such a regression must fail the test, not block CI.
Prints one JSON line per case: each split's documents per dataset (None: not built), or the error.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from megatron_qwen.config.schema import DataBlendEntry
from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.data.records import InputError
from tests.data_support import destroy_single_rank, init_single_rank, tiny_config


def _documents(dataset):
    return None if dataset is None else [d.indices.tolist() for d in dataset.datasets]


def main(cache_dir: str, prefixes: list, cases: list) -> None:
    """``cases``: [split, train samples, validation samples] each."""
    base = tiny_config(type="indexed", cache_dir=cache_dir, blend=[DataBlendEntry(p, 1.0) for p in prefixes])
    base = dataclasses.replace(base, train=dataclasses.replace(base.train, seq_length=8, eval_iters=2))
    init_single_rank(base)
    try:
        for split, train_samples, valid_samples in cases:
            cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, split=split))
            try:
                train, valid = build_datasets(cfg, train_samples, valid_samples)
                result = {"train": _documents(train), "valid": _documents(valid)}
            except InputError as err:
                result = {"error": str(err)}
            print(json.dumps(result), flush=True)
    finally:
        destroy_single_rank()


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]))
