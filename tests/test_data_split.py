"""data.split over small datasets: each split that is built gets a document of every dataset of
the blend, or one line says which dataset, which split and the fix (megatron-core 0.16.1 would
build such a split forever)."""

from __future__ import annotations

import json
import sys

import pytest

from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
from tests.data_support import write_jsonl
from tests.helpers import QUIET, run_cli, train_command

SHARD_DOCUMENTS = (3, 6)  # documents per shard: the 3 of the first are what data.split must cut
# [data.split, train samples, validation samples] for tests/data_split_driver.py
CASES = [("83,17,0", 40, 4), ("84,16,0", 40, 4), ("98,1,1", 40, 0), ("100,0,0", 40, 4), ("0,100,0", 40, 0)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    prefixes = []
    for k, count in enumerate(SHARD_DOCUMENTS):
        write_jsonl(root / f"s{k}.jsonl", [{"text": f"shard {k} document {i} " * 4} for i in range(count)])
        preprocess([str(root / f"s{k}.jsonl")], str(root / f"s{k}"), PreprocessOptions(progress=False))
        prefixes.append(str(root / f"s{k}"))
    return root, prefixes


@pytest.fixture(scope="module")
def built(shards):
    """What build_datasets gives for CASES, built in one process under a timeout (a hang fails)."""
    root, prefixes = shards
    proc = run_cli([sys.executable, "-m", "tests.data_split_driver", str(root / "cache"), json.dumps(prefixes),
                    json.dumps(CASES)], timeout=120)
    return root, dict(zip(CASES, map(json.loads, proc.stdout.splitlines())))


def _split_error(shards, split):
    return (f"data.split={split} gives {shards[1][0]} (3 documents) no validation document; use larger datasets, "
            "or a data.split that gives each split >= 1 document, e.g. data.split=83,17,0, or turn validation off "
            "with train.eval_iters=0")


def test_small_shards_stop_the_cli_in_one_line_instead_of_hanging(shards, tmp_path):
    # The default 98,1,1 gives the 3-document shard no validation document. Before the check
    # megatron-core looped forever building that split (the timeout fails this test).
    run_dir = tmp_path / "run"
    blend = ", ".join(f"{{path: '{p}', weight: 1.0}}" for p in shards[1])
    proc = run_cli(train_command(["model=qwen2_5_tiny", "model.num_layers=1", "data=mock", "data.type=indexed",
                                  f"data.blend=[{blend}]", f"data.cache_dir={tmp_path / 'cache'}",
                                  "train.seq_length=8", "train.micro_batch_size=1", "train.global_batch_size=1",
                                  "train.train_iters=2", "train.eval_interval=1", "train.eval_iters=1",
                                  "optim.warmup_iters=0", "checkpoint.save_interval=null", *QUIET,
                                  f"run_dir={run_dir}"]), check=False, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: " + _split_error(shards, "98,1,1")], proc.stderr[-3000:]
    assert not run_dir.exists()


def test_split_boundaries_are_megatrons(shards, built):
    # 83,17,0 is the smallest validation share that gives 3 documents one: round(0.83 * 3) = 2
    # documents train; 84,16,0 rounds to 3 and leaves validation none.
    root, results = built
    assert results[CASES[0]] == {"train": [[0, 1], [0, 1, 2, 3, 4]], "valid": [[2], [5]]}
    assert results[CASES[1]] == {"error": _split_error(shards, "84,16,0")}
    assert not list((root / "cache").rglob("*-test-*"))  # no split is built that nothing reads


def test_splits_asked_for_no_sample_are_not_built(built):
    # The default split without validation: its 1% (no document of either shard) is never built.
    _, results = built
    assert results[CASES[2]] == {"train": [[0, 1, 2], [0, 1, 2, 3, 4, 5]], "valid": None}
    error = results[CASES[3]]["error"]
    assert error.startswith("data.split=100,0,0 gives validation no share, but train.eval_iters=2 asks for 4 "
                            "validation samples; ") and error.endswith("turn validation off with train.eval_iters=0")
    assert results[CASES[4]]["error"].startswith("data.split=0,100,0 gives training no share")
