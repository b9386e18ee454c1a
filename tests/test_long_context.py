"""The long-context stage: composition, and a tiny end-to-end run (pretrain at 128 tokens, then
the stage at 1,024 tokens with CP2 from that checkpoint)."""

from __future__ import annotations

import pytest
import yaml

from megatron_qwen.config import validate
from megatron_qwen.config.store import compose_config
from megatron_qwen.data.embedded import DOMAINS, domain_documents
from tests.helpers import losses, run_train

PRETRAIN_THETA = 10_000.0  # the report's pretraining base; the stage raises it (ABF)


def test_stage_composes_abf_long_documents_and_a_lower_lr():
    cfg = validate(compose_config(["stage=long_context", "parallel.cp=4"]), 4)
    assert cfg.stage.name == "long_context" and cfg.model.rope_theta == 1e6 and cfg.train.seq_length == 32768
    assert [entry.path for entry in cfg.data.blend] == ["code_files"]
    assert DOMAINS["code_files"] == 0 and domain_documents("code_files") == domain_documents("code")  # whole files
    assert cfg.optim.lr < compose_config([]).optim.lr and cfg.optim.warmup_iters >= 1


@pytest.mark.slow
@pytest.mark.distributed
def test_stage_continues_a_pretrain_run_at_1024_tokens_with_cp2(tmp_path):
    pretrain = run_train(tmp_path / "pretrain", ["train.seq_length=128", "train.train_iters=8",
                                                 f"model.rope_theta={PRETRAIN_THETA}", "checkpoint.save_at_end=true"])
    stage = ["stage=long_context", "data=mock", "train.seq_length=1024", "parallel.cp=2", "train.train_iters=6",
             "train.micro_batch_size=1", "train.global_batch_size=4", "optim.lr=1e-3", "checkpoint.save_at_end=true",
             f"checkpoint.load={tmp_path / 'pretrain' / 'checkpoints'}"]
    long = losses(run_train(tmp_path / "long", stage, nproc=2))
    assert sorted(long) == list(range(1, 7))  # counters start afresh: weights-only load
    assert long[1] < losses(pretrain)[1] - 0.1  # it starts from the pretrained weights ...
    assert long[6] < long[1] - 0.05  # ... and keeps learning at 8x the length
    for saved in (tmp_path / "long" / "config.yaml",
                  tmp_path / "long" / "checkpoints" / "iter_0000006" / "run_config.yaml"):
        config = yaml.safe_load(saved.read_text())
        assert config["model"]["rope_theta"] == 1e6 and config["stage"]["name"] == "long_context"
        assert config["parallel"]["cp"] == 2 and config["train"]["seq_length"] == 1024
