"""Process bootstrap: single process, torchrun, or SLURM srun.

The rank/world-size lookup needs no process group, so the config can be validated
against the real world size before anything is initialized.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch

from megatron_qwen.platform import cpu_compat


@dataclass(frozen=True)
class ProcessEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # single | torchrun | slurm


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist (``node[03-05,9]`` -> ``node03``)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True, timeout=30)
        return out.stdout.split()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        match = re.match(r"([^\[,]+)(?:\[(\d+))?", nodelist)
        return match.group(1) + (match.group(2) or "") if match else "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def detect_process_env(environ: Optional[dict] = None) -> ProcessEnv:
    """Reads rank and world size from torchrun's or SLURM's variables (torchrun wins)."""
    env = os.environ if environ is None else environ
    if "RANK" in env and "WORLD_SIZE" in env:
        return ProcessEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                          env.get("MASTER_ADDR", "127.0.0.1"), int(env.get("MASTER_PORT", 29500)), "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        job = int(env.get("SLURM_JOB_ID", "0"))
        addr = env.get("MASTER_ADDR") or _first_slurm_host(env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        # Same port on every task of a job, different for concurrent jobs on a node.
        port = int(env.get("MASTER_PORT", 20000 + job % 20000))
        return ProcessEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                          int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    return ProcessEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or _free_port(), "single")


def init_process_group(penv: ProcessEnv, backend: Optional[str] = None, timeout_min: float = 30) -> torch.device:
    """Initializes torch.distributed (nccl on GPU, gloo on CPU) and returns this rank's device.

    ``timeout_min`` (``cluster.pg_timeout_minutes``) bounds how long the rendezvous and every
    collective wait for a missing rank: after a rank crashed, the others fail this long later
    instead of holding the allocation (NCCL's watchdog then aborts them; SLURM's ``srun
    --wait`` ends the step sooner still). On a machine without CUDA this also installs the CPU
    compatibility layer.
    """
    if torch.cuda.is_available():
        torch.cuda.set_device(penv.local_rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
        backend = backend or "nccl"
    else:
        cpu_compat.install()
        device = torch.device("cpu")
        backend = backend or "gloo"
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{penv.master_addr}:{penv.master_port}",
            rank=penv.rank,
            world_size=penv.world_size,
            timeout=timedelta(minutes=timeout_min),
        )
    return device
