"""train.dry_run_search: valid layouts that fit, ranked by the step-time model."""

from __future__ import annotations

import dataclasses

import pytest

from megatron_qwen.config import validate
from megatron_qwen.config.memory import GIB, estimate_memory
from megatron_qwen.config.plan import checkpoint_bytes, signal_lead_seconds
from megatron_qwen.config.search import RESERVE_GIB, search_layouts, step_seconds
from megatron_qwen.config.store import compose_config
from tests.helpers import run_cli, train_command


@pytest.fixture(scope="module")
def qwen_72b():
    return compose_config(["experiment=pretrain_72b"])  # seq 4096, global batch 512, bf16, 80 GB GPUs


@pytest.fixture(scope="module")
def found_72b(qwen_72b):
    return search_layouts(qwen_72b, 64)


def test_72b_on_64_gpus_has_layouts_that_fit_and_every_listed_one_validates(qwen_72b, found_72b):
    assert qwen_72b.train.seq_length == 4096 and qwen_72b.cluster.gpu_memory_gb == 80
    assert len(found_72b) > 10
    for candidate in found_72b:
        cfg = validate(candidate.cfg, 64)  # raises if the layout were invalid
        assert (cfg.parallel.tp * cfg.parallel.pp * cfg.parallel.dp, cfg.train.global_batch_size) == (64, 512)
        assert estimate_memory(cfg).peak.total / GIB == pytest.approx(candidate.memory_gib)
        assert candidate.memory_gib <= 80 - RESERVE_GIB
    times = [c.step_seconds for c in found_72b]
    assert times == sorted(times)


def test_the_search_skips_what_does_not_fit(qwen_72b, found_72b):
    small = search_layouts(dataclasses.replace(qwen_72b, cluster=dataclasses.replace(qwen_72b.cluster,
                                                                                       gpu_memory_gb=40)), 64)
    assert 0 < len(small) < len(found_72b) and all(c.memory_gib <= 40 - RESERVE_GIB for c in small)


def test_step_time_model_charges_the_pipeline_bubble(qwen_72b):
    def per_sample(global_batch=512, **parallel):
        layout = dict(tp=8, pp=4, vpp=None, pp_layout=None, sp=True, use_distributed_optimizer=True,
                      overlap_param_gather_with_optimizer_step=False)
        layout.update(parallel)
        cfg = dataclasses.replace(qwen_72b, parallel=dataclasses.replace(qwen_72b.parallel, **layout),
                                  train=dataclasses.replace(qwen_72b.train, global_batch_size=global_batch))
        return step_seconds(validate(cfg, 64), 989.0) / global_batch

    assert per_sample(vpp=5) < per_sample()  # interleaving shrinks the bubble
    assert per_sample(global_batch=16) > 1.1 * per_sample()  # 8 micro-batches over 4 stages: a large bubble


def test_checkpoint_size_and_signal_lead_time_of_72b(qwen_72b):
    cfg = validate(qwen_72b, 64)
    assert checkpoint_bytes(cfg) == pytest.approx(72.7e9 * 14, rel=0.01)  # ~1 TB
    slow = dataclasses.replace(cfg, cluster=dataclasses.replace(cfg.cluster, checkpoint_write_gbps=2.0))
    assert 120 <= signal_lead_seconds(cfg) < signal_lead_seconds(slow)
    assert signal_lead_seconds(cfg) % 60 == 0


def test_dry_run_search_cli_prints_the_ranked_table():
    proc = run_cli(train_command(["experiment=pretrain_72b", "train.dry_run_search=true",
                                  "train.dry_run_world_size=64"]))
    assert "layout search: qwen2_5_72b (72.7B), 64 GPUs of 80 GB" in proc.stdout
    assert " tp  pp  vpp  ep   dp  micro  recompute  mem GiB   step s" in proc.stdout
    assert "not modelled" in proc.stdout
