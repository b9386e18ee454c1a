"""The inter-node transport check: NCCL's log lines as NCCL writes them, the decision, the wiring.

No NCCL runs here (CPU only): the logs below are NCCL's own INFO lines (from NCCL 2.4 to 2.28 runs
on InfiniBand, RoCE, HPC-X's IBext plugin, AWS EFA and plain Ethernet) and the collective part
runs on a one-rank gloo group that reports itself as NCCL.
"""

from __future__ import annotations

import logging
import os

import pytest
import torch.distributed as dist

from megatron_qwen.config import ConfigError, validate
from megatron_qwen.config.store import compose_config
from megatron_qwen.platform import nccl_transport
from megatron_qwen.platform.launch import ProcessEnv
from tests.helpers import free_port

# NCCL 2.7.8 on GCP, no InfiniBand: every connection over TCP.
SOCKET_LOG = """\
slurm-train-compute-0-0:2139:2139 [0] NCCL INFO Bootstrap : Using [0]eth0:10.0.0.34<0>
slurm-train-compute-0-0:2139:2139 [0] NCCL INFO NET/Plugin : No plugin found (libnccl-net.so), using internal implementation
slurm-train-compute-0-0:2139:2139 [0] NCCL INFO NET/IB : No device found.
slurm-train-compute-0-0:2139:2139 [0] NCCL INFO NET/Socket : Using [0]eth0:10.0.0.34<0>
slurm-train-compute-0-0:2139:2139 [0] NCCL INFO Using network Socket
NCCL version 2.7.8+cuda10.2
slurm-train-compute-0-0:2139:2250 [0] NCCL INFO Channel 00/02 :    0   1
"""
# NCCL 2.19.3 on RoCE: the socket transport is initialized (and logged) too, IB is the one used.
ROCE_LOG = """\
dgxh100-4:460770:460770 [0] NCCL INFO Bootstrap : Using enp220s0np0:11.1.128.136<0>
dgxh100-4:460770:460842 [0] NCCL INFO NET/Socket : Using [0]enp220s0np0:11.1.128.136<0>
dgxh100-4:460770:460842 [0] NCCL INFO NET/IB : Using [0]mlx5_10:1/RoCE [1]mlx5_11:1/RoCE [RO]; OOB enp220s0np0:11.1.128.136<0>
dgxh100-4:460770:460842 [0] NCCL INFO Using non-device net plugin version 0
dgxh100-4:460770:460842 [0] NCCL INFO Using network IB
"""
# HPC-X's RDMA/SHARP plugin names its network IBext.
IBEXT_LOG = """\
qh100-gpu19:49357:49418 [3] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB/SHARP [1]mlx5_1:1/IB/SHARP [RO]; OOB ibp25s0:10.20.0.119<0>
qh100-gpu19:49357:49418 [3] NCCL INFO Using network IBext
"""
# NCCL 2.28: the plugin assignment line, with `srun --label`'s rank prefix.
NCCL_228_LOG = """\
[3] nccl-sleep-c7d759db6-2bp29:2620971:2620971 [3] NCCL INFO NET/IB : Using [0]mlx5_0:1/IB [RO]; OOB eth0:172.25.30.42<0>
[3] nccl-sleep-c7d759db6-2bp29:2620971:2620971 [3] NCCL INFO Initialized NET plugin IB
[3] nccl-sleep-c7d759db6-2bp29:2620971:2620971 [3] NCCL INFO Assigned NET plugin IB to comm
"""
# AWS EFA through aws-ofi-nccl: the connections name the network (NCCL 2.23 and 2.4's "Ring" lines).
EFA_LOG = """\
8h200-2:14630:14695 [1] NCCL INFO Channel 07/0 : 1[1] -> 0[0] [send] via NET/AWS Libfabric/1/GDRDMA
ip-192-168-29-243:26465:26533 [0] NCCL INFO Ring 00 : 7 -> 8 [receive] via NET/AWS Libfabric/0
ip-192-168-29-243:26465:26533 [0] NCCL INFO Ring 00 : 8[0] -> 9[1] via P2P/IPC
"""


@pytest.mark.parametrize("log, networks", [
    (SOCKET_LOG, {"Socket"}), (ROCE_LOG, {"IB"}), (IBEXT_LOG, {"IBext"}), (NCCL_228_LOG, {"IB"}),
    (EFA_LOG, {"AWS Libfabric"}), ("NCCL version 2.21.5+cuda12.4\n", set()),
])
def test_the_network_is_read_from_nccls_own_lines(log, networks):
    assert nccl_transport.networks_in_log(log) == networks


def test_connections_decide_over_the_selected_network():
    # A connection that fell back to sockets although IB was selected is what the data takes.
    log = ROCE_LOG + "dgxh100-4:460770:460842 [0] NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/Socket/0\n"
    assert nccl_transport.networks_in_log(log) == {"Socket"}


def test_sockets_between_nodes_are_refused_unless_allowed():
    nodes = [("gpu-node01", ["IB"]), ("gpu-node02", ["Socket"]), ("gpu-node03", [])]
    error, warning = nccl_transport.transport_problem(nodes, allow_socket=False)
    assert "over TCP sockets (NET/Socket) on 1 of 3 node(s) (gpu-node02)" in error
    assert "MEGATRON_QWEN_SITE_ENV" in error and "cluster.allow_socket_transport=true" in error
    assert "\n" not in error and "no network on gpu-node03" in warning
    error, warning = nccl_transport.transport_problem(nodes[:2], allow_socket=True)
    assert error is None and "accepted (cluster.allow_socket_transport=true)" in warning
    assert nccl_transport.transport_problem([("a", ["IB"]), ("b", ["AWS Libfabric"])], False) == (None, None)


def _penv(rank: int, local_rank: int, world: int) -> ProcessEnv:
    return ProcessEnv(rank, world, local_rank, "127.0.0.1", free_port(), "slurm")


def test_only_the_first_rank_of_each_node_of_a_multi_node_job_logs(tmp_path):
    cfg = compose_config(["cluster=slurm_h100", f"run_dir={tmp_path}"])
    assert nccl_transport.log_env(cfg, _penv(8, 0, 16)) == {
        "NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET", "NCCL_DEBUG_FILE": str(tmp_path / "nccl" / "rank8.log")}
    assert nccl_transport.log_env(cfg, _penv(9, 1, 16)) == {}  # one log per node
    assert nccl_transport.log_env(cfg, _penv(0, 0, 8)) == {}  # one node: NVLink only, nothing to check
    gloo = compose_config(["cluster=slurm_h100", "cluster.backend=gloo", f"run_dir={tmp_path}"])
    assert nccl_transport.log_env(gloo, _penv(8, 0, 16)) == {}


def test_allowing_sockets_is_refused_where_nothing_reads_it():
    allowed = ["cluster=slurm_h100", "cluster.allow_socket_transport=true", "data=mock", "train.global_batch_size=32"]
    validate(compose_config(allowed), 16)
    with pytest.raises(ConfigError, match=r"cluster.allow_socket_transport=true is read only by jobs whose NCCL "
                                          r"spans nodes \(got world size 8, cluster.gpus_per_node=8"):
        validate(compose_config(allowed), 8)


@pytest.fixture
def one_rank_nccl(monkeypatch):
    """A one-rank gloo process group that reports itself as NCCL (the check's collectives run on it)."""
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    yield
    dist.destroy_process_group()


def test_a_multi_node_start_reads_its_log_and_stops_on_sockets(tmp_path, monkeypatch, one_rank_nccl, caplog):
    for key in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE"):  # restored after the test
        monkeypatch.setenv(key, "")
    penv = _penv(0, 0, 16)
    cfg = compose_config(["cluster=slurm_h100", f"run_dir={tmp_path}"])
    log = nccl_transport.log_path(cfg.run_dir, 0)
    log.parent.mkdir()
    log.write_text(ROCE_LOG)  # an earlier attempt's log is cleared
    nccl_transport.prepare_log(cfg, penv)
    assert not log.exists() and os.environ["NCCL_DEBUG_FILE"] == str(log) and os.environ["NCCL_DEBUG"] == "INFO"
    log.write_text(SOCKET_LOG)  # what NCCL writes during the check's first collective
    with pytest.raises(ConfigError, match=r"over TCP sockets \(NET/Socket\) on 1 of 1 node\(s\)"):
        nccl_transport.check(cfg, penv)
    cfg.cluster.allow_socket_transport = True
    with caplog.at_level(logging.WARNING):
        nccl_transport.check(cfg, penv)
    assert "accepted (cluster.allow_socket_transport=true)" in caplog.text
    log.write_text(ROCE_LOG)
    cfg.cluster.allow_socket_transport = False
    nccl_transport.check(cfg, penv)


def test_the_trainer_stops_a_multi_node_job_on_sockets_before_writing_anything(tmp_path, monkeypatch):
    # rank 0 of a 2-node job (16 ranks) on a one-rank gloo group that reports itself as NCCL; NCCL's
    # log appears during the check's first collective, as it does on a real start.
    from megatron_qwen import train
    from megatron_qwen.config import features
    from megatron_qwen.platform import collectives, launch, orphans
    from megatron_qwen.training.resilience import signals

    # The trainer sets NCCL's log variables and the layout's (CUDA_DEVICE_MAX_CONNECTIONS, ...) in this
    # process: on a copy of the environment, so that later tests see the one they started with.
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for key in ("NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE"):
        os.environ.pop(key, None)
    monkeypatch.setattr(features, "detect", lambda: features.NONE)
    monkeypatch.setattr(signals, "install", lambda name: None)
    monkeypatch.setattr(orphans, "install", lambda: None)
    monkeypatch.setattr(launch, "detect_process_env", lambda: _penv(0, 0, 16))
    monkeypatch.setattr(launch, "init_process_group", lambda penv, backend, timeout: dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1))
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "nccl")
    barrier = collectives.barrier

    def first_collective(group=None):
        barrier(group)
        nccl_transport.log_path(str(tmp_path / "run"), 0).write_text(SOCKET_LOG)

    monkeypatch.setattr(collectives, "barrier", first_collective)
    cfg = compose_config(["data=mock", "train.global_batch_size=32", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"NET/Socket.*cluster.allow_socket_transport=true$"):
        train.run(cfg)
    assert not dist.is_initialized()
    assert os.environ["NCCL_DEBUG_FILE"] == str(tmp_path / "run" / "nccl" / "rank0.log")
    assert {p.name for p in (tmp_path / "run").iterdir()} == {"nccl"}  # no config.yaml, no checkpoints
    train._remove_if_only_hydra(tmp_path / "run")  # what main does on the error: nothing is left
    assert not (tmp_path / "run").exists()
