"""End to end through the trainer CLI: the default job on the embedded corpus, and stage=sft."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import losses, read_metrics, run_train

# Shortened by overrides only: the default job's model, vocabulary, data and batch stay as configured.
SHORT = ["train.train_iters=24", "train.eval_interval=8", "optim.warmup_iters=4", "checkpoint.save_interval=null",
         "checkpoint.save_at_end=false", "logging.log_interval=4"]


@pytest.mark.slow
def test_default_job_trains_on_embedded_corpus_and_validation_loss_falls(tmp_path):
    records = run_train(tmp_path / "run", [*SHORT, f"data.cache_dir={tmp_path / 'cache'}"], tiny=False)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["data"]["type"] == "embedded" and resolved["model"]["vocab_size"] == 151936
    val = [r["val_loss"] for r in read_metrics(tmp_path / "run", "eval.jsonl")]
    assert len(val) == 3 and val[0] > val[1] > val[2], val
    train = losses(records)
    assert train[24] < train[4], train


@pytest.mark.slow
def test_stage_sft_trains_on_packed_conversations(tmp_path):
    overrides = ["stage=sft", "train.train_iters=12", "train.eval_interval=0", "optim.warmup_iters=2",
                 "optim.lr=3e-3", "checkpoint.save_interval=null", "checkpoint.save_at_end=false",
                 "logging.log_interval=1", f"data.cache_dir={tmp_path / 'cache'}"]
    records = run_train(tmp_path / "run", overrides, tiny=False)
    resolved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert resolved["stage"]["name"] == "sft" and resolved["data"]["type"] == "sft"
    train = losses(records)
    assert sum(train[s] for s in (10, 11, 12)) < sum(train[s] for s in (1, 2, 3)), train
