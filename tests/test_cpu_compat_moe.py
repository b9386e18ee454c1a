"""CPU compatibility layer, MoE parts: host split sizes for the alltoall dispatcher and
uneven all-gathers over gloo (expert tensor parallel)."""

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from megatron_qwen.platform import cpu_compat
from tests.helpers import free_port

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the layer is installed only without CUDA")


def test_host_tensor_gives_numpy_split_sizes():
    splits = torch.tensor([3, 0, 5])
    host = cpu_compat.host_tensor(splits, as_numpy=True)
    assert isinstance(host, np.ndarray) and host.tolist() == [3, 0, 5]
    # Without as_numpy (tokens_per_expert, num_out_tokens) the tensor is kept, like the CUDA path.
    assert cpu_compat.host_tensor(splits) is splits
    assert cpu_compat.host_tensor(None, as_numpy=True) is None


def test_install_replaces_the_dispatcher_binding():
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    assert cpu_compat.install()
    assert token_dispatcher.maybe_move_tensor_to_cpu is cpu_compat.host_tensor
    assert moe_utils.maybe_move_tensor_to_cpu is cpu_compat.host_tensor


def _exchange(rank: int, port: int) -> None:
    """Rank r sends r+1 rows to every peer and gathers uneven row counts, as the alltoall
    dispatcher does at EP2 and ETP2."""
    cpu_compat.install()
    from megatron.core.tensor_parallel import mappings

    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        rows = rank + 1
        # all_to_all_single refuses tensors as split sizes; the host copies are numpy arrays.
        input_splits = cpu_compat.host_tensor(torch.tensor([rows, rows]), as_numpy=True)
        output_splits = cpu_compat.host_tensor(torch.tensor([1, 2]), as_numpy=True)
        x = torch.full((2 * rows, 4), float(rank))  # [tokens, h]
        out = torch.empty(3, 4)
        torch.distributed.all_to_all_single(out, x, output_split_sizes=output_splits, input_split_sizes=input_splits)
        assert out[:, 0].tolist() == [0.0, 1.0, 1.0]
        group = torch.distributed.group.WORLD
        gathered = mappings._gather_along_first_dim(torch.full((rows, 4), float(rank)), group, [1, 2])
        assert gathered[:, 0].tolist() == [0.0, 1.0, 1.0]
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.distributed
def test_dispatcher_collectives_on_gloo():
    mp.spawn(_exchange, args=(free_port(),), nprocs=2, join=True)
