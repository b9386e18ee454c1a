"""The network NCCL moves data on between nodes, read back from NCCL's own log, checked at start.

A multi-node job whose NCCL falls back to TCP sockets (``NET/Socket``: no InfiniBand/RoCE verbs in
the container, no EFA plugin, a wrong ``NCCL_IB_HCA``) trains, several times slower. NCCL offers no
API for the transport it picked, but logs it at INFO level: the selected network once per process
(``NCCL INFO Using network IB``; ``Socket``, ``IBext`` with HPC-X's plugin, ``AWS Libfabric`` with
EFA's) and each connection it sets up (``Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0``). So in a
job that spans nodes the first rank of each node has NCCL log INIT and NET into the run directory
(:func:`log_env`, applied before NCCL reads its environment), the world's first collective runs,
and :func:`check` reads the networks back and refuses ``Socket`` unless
``cluster.allow_socket_transport``. The fabric's variables come from the site hook
(``MEGATRON_QWEN_SITE_ENV``, slurm/env.sh), never from the templates.
"""

from __future__ import annotations

import logging
import os
import re
import socket
from pathlib import Path
from typing import Dict, List, Optional, Set, Tuple

from megatron_qwen.config.schema import Config
from megatron_qwen.config.validate import ConfigError
from megatron_qwen.platform.launch import ProcessEnv

LOG_DIR = "nccl"  # under the run directory: one log per node (its first rank)
SOCKET = "Socket"  # NCCL's name for its TCP transport

# "host:pid:tid [dev] NCCL INFO Using network IB"; NCCL >= 2.27 also "Assigned NET plugin IB to comm".
_SELECTED = re.compile(r"NCCL INFO (?:Using network (?P<using>.+?)|Assigned NET plugin (?P<assigned>.+?) to comm)\s*$")
# "... NCCL INFO Channel 00/0 : 0[0] -> 8[0] [send] via NET/IB/0" (also ".../0/GDRDMA"; "Ring 00 : ..."
# before NCCL 2.5); names may hold spaces ("AWS Libfabric").
_CONNECTION = re.compile(r"NCCL INFO .* via NET/(?P<net>[^/]+)/\d+")


def needs_check(cfg: Config, world_size: int) -> bool:
    """Whether the job spans nodes and may use NCCL (the backend is decided later: gloo skips the check)."""
    return world_size > cfg.cluster.gpus_per_node and cfg.cluster.backend != "gloo"


def log_path(run_dir: str, rank: int) -> Path:
    """Where NCCL logs for global ``rank``."""
    return Path(run_dir) / LOG_DIR / f"rank{rank}.log"


def log_env(cfg: Config, penv: ProcessEnv) -> Dict[str, str]:
    """The variables that make NCCL log its network choice to :func:`log_path` on the first rank of
    each node of a multi-node job; empty elsewhere.

    NOTE: NCCL reads them once, at its first log call, and then writes its whole log (warnings
    included) to that file instead of stderr, so they are set on one rank per node only.
    """
    if penv.local_rank != 0 or not needs_check(cfg, penv.world_size):
        return {}
    return {"NCCL_DEBUG": "INFO", "NCCL_DEBUG_SUBSYS": "INIT,NET",
            "NCCL_DEBUG_FILE": str(log_path(cfg.run_dir, penv.rank))}


def prepare_log(cfg: Config, penv: ProcessEnv) -> None:
    """Applies :func:`log_env` to this process (before NCCL's first log call) and clears the log of an
    earlier attempt, so that :func:`check` reads this one's."""
    env = log_env(cfg, penv)
    if env:
        path = Path(env["NCCL_DEBUG_FILE"])
        path.parent.mkdir(parents=True, exist_ok=True)  # NCCL logs to stdout when it cannot open the file
        path.unlink(missing_ok=True)
        os.environ.update(env)


def networks_in_log(text: str) -> Set[str]:
    """The networks an NCCL INFO log shows in use: those its connections go through, else those it selected.

    ``NET/Socket : Using [0]eth0:...`` alone does not count: NCCL initializes its socket transport
    (and logs that line) beside InfiniBand too.
    """
    connections = {m.group("net") for m in map(_CONNECTION.search, text.splitlines()) if m}
    if connections:
        return connections
    selected = (m.group("using") or m.group("assigned") for m in map(_SELECTED.search, text.splitlines()) if m)
    return set(selected)


def transport_problem(per_node: List[Tuple[str, List[str]]], allow_socket: bool) -> Tuple[Optional[str], Optional[str]]:
    """(error, warning) for the networks each node's first rank saw, ``[(host, networks), ...]``."""
    on_socket = sorted(host for host, nets in per_node if SOCKET in nets)
    unknown = sorted(host for host, nets in per_node if not nets)
    warning = (f"NCCL's log names no network on {', '.join(unknown)} (see <run_dir>/{LOG_DIR}/): the inter-node "
               "transport was not checked there") if unknown else None
    if not on_socket:
        return None, warning
    problem = (f"NCCL moves data between nodes over TCP sockets (NET/Socket) on {len(on_socket)} of {len(per_node)} "
               f"node(s) ({', '.join(on_socket[:4])}{', ...' if len(on_socket) > 4 else ''}), several times slower "
               "than InfiniBand/RoCE/EFA")
    if allow_socket:
        return None, f"{problem}; accepted (cluster.allow_socket_transport=true)"
    return (f"{problem}: export the fabric's variables (NCCL_IB_HCA, NCCL_SOCKET_IFNAME, EFA's FI_PROVIDER=efa and "
            "its NCCL plugin, ...) in the site hook MEGATRON_QWEN_SITE_ENV and mount the devices into the container, "
            "or accept the slow path with cluster.allow_socket_transport=true"), warning


def check(cfg: Config, penv: ProcessEnv) -> None:
    """Collective, after the process group exists: runs the world's first NCCL collective, reads the
    network from each node's log and refuses TCP sockets between nodes (every rank raises).

    Raises:
        ConfigError: one line naming the nodes on sockets and the fix.
    """
    import torch.distributed as dist

    from megatron_qwen.platform import collectives

    if not needs_check(cfg, penv.world_size) or dist.get_backend() != "nccl":
        return
    collectives.barrier()  # NCCL builds the world communicator and connects its rings and trees here
    path = log_path(cfg.run_dir, penv.rank)
    mine = (socket.gethostname(), sorted(networks_in_log(path.read_text() if path.is_file() else "")))
    per_node = [seen for seen in collectives.all_gather_objects(mine if penv.local_rank == 0 else None) if seen]
    error, warning = transport_problem(per_node, cfg.cluster.allow_socket_transport)
    if warning and penv.rank == 0:
        logging.getLogger(__name__).warning(warning)
    if error:
        raise ConfigError(error)
    if penv.rank == 0:
        networks = sorted({net for _, nets in per_node for net in nets})
        logging.getLogger(__name__).info("NCCL between nodes: %s", ", ".join(networks))
