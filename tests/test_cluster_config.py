"""What a multi-node job needs, checked before it is queued; a missing rank fails the job."""

from __future__ import annotations

import time

import pytest

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.store import compose_config
from megatron_qwen.platform.launch import ProcessEnv, init_process_group
from tests.helpers import free_port


def test_multi_node_jobs_need_a_shared_dataset_cache():
    batch = ["train.global_batch_size=32", "cluster=slurm_h100"]
    cfg = compose_config(["data=embedded", *batch])
    validate(cfg, 8)  # one node: rank 0's cache is on the same machine
    with pytest.raises(ConfigError, match=r"a 2-node job \(world size 16 > cluster.gpus_per_node=8\) needs "
                                          r"data.cache_dir .* set data.cache_dir=/shared/path"):
        validate(cfg, 16)
    validate(compose_config(["data=embedded", *batch, "data.cache_dir=/shared/cache"]), 16)
    validate(compose_config(["data=mock", *batch]), 16)  # mock data builds no cache


def test_cluster_presets_put_the_cache_in_the_shared_submit_directory(monkeypatch):
    monkeypatch.delenv("MEGATRON_QWEN_CACHE", raising=False)
    assert compose_config(["experiment=pretrain_72b"]).data.cache_dir == ".cache/megatron_qwen"
    monkeypatch.setenv("MEGATRON_QWEN_CACHE", "/lustre/cache")
    assert compose_config(["experiment=pretrain_7b"]).data.cache_dir == "/lustre/cache"


def test_tensor_parallelism_must_stay_inside_a_node():
    with pytest.raises(ConfigError, match=r"parallel.tp=16 spans nodes \(cluster.gpus_per_node=8\)"):
        validate(compose_config(["model=qwen2_5_72b", "data=mock", "parallel.tp=16", "parallel.sp=true",
                                         "train.global_batch_size=32"]), 32)


@pytest.mark.parametrize("override, message", [
    ("cluster.pg_timeout_minutes=0", "cluster.pg_timeout_minutes=0.0 must be > 0"),
    ("cluster.backend=mpi", "cluster.backend='mpi' must be one of"),
    ("cluster.peak_tflops=-1", "cluster.peak_tflops=-1.0 must be > 0"),
    ("train.manual_gc_interval=-5", "train.manual_gc_interval=-5 must be >= 0"),
])
def test_cluster_settings_are_validated(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        validate(compose_config([override]), 1)


def test_a_missing_rank_fails_the_rendezvous_after_the_configured_timeout():
    penv = ProcessEnv(rank=0, world_size=2, local_rank=0, master_addr="127.0.0.1", master_port=free_port(),
                      launcher="torchrun")
    start = time.monotonic()
    with pytest.raises(Exception, match="(?i)timed? ?out"):
        init_process_group(penv, "gloo", timeout_min=3 / 60)  # rank 1 never comes
    assert time.monotonic() - start < 30
