"""The CPU compatibility layer: megatron's CUDA requests land on the CPU, deterministically.

Runs in a subprocess per test so that the process-wide patches never leak into other tests
(and so that ``install()`` is exercised from a clean interpreter).
"""

import subprocess
import sys
import textwrap

from tests.helpers import REPO

PRELUDE = """
import torch
from megatron_qwen.platform import cpu_compat
assert not torch.cuda.is_available()
assert cpu_compat.install() and cpu_compat.is_active() and cpu_compat.install()
"""


def _run(body: str) -> str:
    code = PRELUDE + textwrap.dedent(body)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_cuda_device_arguments_map_to_cpu():
    _run("""
    cpu = torch.device("cpu")
    for device in ("cuda", "cuda:0", torch.device("cuda", 0), 0, torch.cuda.current_device()):
        assert torch.empty(2, device=device).device == cpu
        assert torch.zeros(2, 3, device=device).device == cpu
        assert torch.arange(4, device=device).device == cpu
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.to("cuda").device == cpu and t.to(device="cuda:0").device == cpu
    assert t.to("cuda", torch.float64).dtype == torch.float64
    assert t.new_zeros(2, device="cuda").device == cpu
    assert t.type() == "torch.cuda.FloatTensor" and t.half().type() == "torch.cuda.HalfTensor"
    assert t.type(torch.float64).dtype == torch.float64  # conversions still convert
    assert torch.cuda.current_device() == 0
    torch.cuda.synchronize()
    """)


def test_backward_allocations_are_redirected():
    # Autograd runs backward with torch-function modes disabled; megatron's custom
    # functions allocate CUDA buffers there (e.g. linear_with_grad_accumulation).
    _run("""
    class Double(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return 2 * x
        @staticmethod
        def backward(ctx, grad):
            return torch.empty(grad.shape, device=torch.cuda.current_device()).fill_(2.0) * grad
    x = torch.ones(3, requires_grad=True)
    Double.apply(x).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 2.0))
    """)


def test_rng_tracker_is_seeded_deterministically():
    out = _run("""
    from megatron.core.tensor_parallel import random as mrandom
    def draws(seed):
        mrandom.get_cuda_rng_tracker().reset()
        mrandom.get_cuda_rng_tracker().add("model-parallel-rng", seed)
        torch.manual_seed(7)
        before = torch.get_rng_state()
        with mrandom.get_cuda_rng_tracker().fork():
            inside = torch.rand(4, device="cuda")
        assert torch.equal(before, torch.get_rng_state()), "fork must restore the default state"
        return inside
    a, b, c = draws(123), draws(123), draws(124)
    assert torch.equal(a, b) and not torch.equal(a, c)
    print("ok")
    """)
    assert "ok" in out


def test_streams_and_events_are_synchronous_stand_ins():
    _run("""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    e = torch.cuda.Event()
    e.record(s)
    with torch.cuda.stream(s):
        x = torch.ones(2, device="cuda")
    x.record_stream(s)
    torch.cuda.current_stream().synchronize()
    assert x.sum().item() == 2.0
    """)


def test_not_installed_in_a_fresh_process():
    code = "from megatron_qwen.platform import cpu_compat; print(cpu_compat.is_active())"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.stdout.strip() == "False"


def test_pinned_memory_requests_and_yarn_rotary_embedding_run_on_cpu():
    # megatron pins the context-parallel index of the rotary slice; YaRN builds under
    # torch.device(current_device()). Neither exists without an accelerator.
    out = _run("""
    from megatron.core.models.common.embeddings import rope_utils
    from megatron.core.models.common.embeddings.yarn_rotary_pos_embedding import YarnRotaryEmbedding
    t = torch.tensor([1, 2], device="cpu", pin_memory=True).cuda(non_blocking=True)
    assert t.tolist() == [1, 2] and not t.is_pinned()

    class Group:  # CP rank 1 of 2: chunks 1 and 2 of 4
        size = staticmethod(lambda: 2)
        rank = staticmethod(lambda: 1)
    emb = torch.arange(8.0)[:, None, None, None]
    assert rope_utils.get_pos_emb_on_this_cp_rank(emb, 0, Group()).flatten().tolist() == [2, 3, 4, 5]
    yarn = YarnRotaryEmbedding(16, rotary_base=1e6, scaling_factor=4.0, original_max_position_embeddings=64)
    freqs, mscale = yarn(32)
    assert freqs.shape == (32, 1, 1, 16) and freqs.device.type == "cpu"
    assert abs(mscale - (0.1 * __import__("math").log(4.0) + 1)) < 1e-12
    print("ok")
    """)
    assert "ok" in out
