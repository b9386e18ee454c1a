"""Every collective goes through megatron_qwen/platform/collectives.py, which places tensors on the device.

NCCL rejects host tensors even in a one-rank group and gloo accepts them, so no CPU test can
see a host tensor handed to a collective: the rule is checked on the source instead.
"""

from __future__ import annotations

import ast
from typing import List

import pytest
import torch

from megatron_qwen.convert.verify_worker import join_process_group, spawn_ranks
from megatron_qwen.platform import collectives
from tests.helpers import REPO, free_port

PACKAGE = REPO / "megatron_qwen"
ALLOWED = PACKAGE / "platform" / "collectives.py"
COLLECTIVES = {"all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object", "all_to_all",
               "all_to_all_single", "barrier", "monitored_barrier", "batch_isend_irecv", "broadcast",
               "broadcast_object_list", "gather", "gather_object", "irecv", "isend", "recv", "reduce",
               "reduce_scatter", "reduce_scatter_tensor", "scatter", "scatter_object_list", "send",
               "_all_gather_base", "_reduce_scatter_base"}


def _dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def collective_calls(source: str) -> List[str]:
    """``line: call`` of every torch.distributed collective in ``source`` (any alias of the module)."""
    tree = ast.parse(source)
    aliases = {"torch.distributed"}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            aliases |= {a.asname for a in node.names if a.name == "torch.distributed" and a.asname}
        elif isinstance(node, ast.ImportFrom) and node.module == "torch.distributed":
            found += [f"{node.lineno}: from torch.distributed import {a.name}" for a in node.names
                      if a.name in COLLECTIVES]
        elif isinstance(node, ast.ImportFrom) and node.module == "torch":
            aliases |= {a.asname or a.name for a in node.names if a.name == "distributed"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in COLLECTIVES:
            if _dotted(node.func.value) in aliases:
                found.append(f"{node.lineno}: {_dotted(node.func)}")
    return found


def test_the_scan_sees_every_spelling():
    source = ("import torch\nimport torch.distributed as dist\nfrom torch import distributed\n"
              "torch.distributed.all_reduce(x)\ndist.barrier()\ndistributed.all_gather(p, x)\n"
              "from torch.distributed import broadcast\ncollectives.all_reduce(x)\nx.all_reduce()\n")
    assert [line.split(":")[0] for line in collective_calls(source)] == ["7", "4", "5", "6"]


def test_no_collective_outside_the_device_safe_module():
    offenders = [f"{path.relative_to(REPO)}:{call}" for path in sorted(PACKAGE.rglob("*.py")) if path != ALLOWED
                 for call in collective_calls(path.read_text())]
    assert not offenders, ("collectives must go through megatron_qwen/platform/collectives.py (NCCL rejects host "
                           f"tensors): {offenders}")


def _check(rank: int, port: int) -> None:
    join_process_group(rank, 2, port, threads=1)
    try:
        value = torch.tensor([float(rank + 1)], dtype=torch.float64)
        assert collectives.all_reduce(value) is value and value.item() == 3.0  # in place, returned
        peak = torch.tensor([rank], dtype=torch.int64)
        assert collectives.all_reduce(peak, op=collectives.ReduceOp.MAX).item() == 1
        parts = collectives.all_gather(torch.full((2, 3), float(rank)))
        assert [p[0, 0].item() for p in parts] == [0.0, 1.0] and parts[0].device == torch.device("cpu")
        out = collectives.all_gather_into_tensor(torch.empty(4), torch.full((2,), float(rank)))
        assert out.tolist() == [0.0, 0.0, 1.0, 1.0]
        token = collectives.broadcast(torch.tensor([10 + rank]), src=1)
        assert token.item() == 11
        assert collectives.broadcast_object({"rank": rank}, src=0) == {"rank": 0}
        assert collectives.gather_objects(rank * 2, dst=0) == ([0, 2] if rank == 0 else None)
        assert collectives.all_gather_objects(f"r{rank}") == ["r0", "r1"]
        collectives.barrier()
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_each_collective_returns_the_values_where_the_caller_wants_them():
    spawn_ranks(_check, free_port(), 2, "collectives check")
