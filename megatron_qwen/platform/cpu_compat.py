"""Run megatron-core on a machine without CUDA.

megatron-core 0.16 asks for CUDA in many places: ``torch.cuda.current_device()``,
``device='cuda'`` tensor factories, ``.cuda()``, the CUDA RNG tracker, CUDA streams
in the MoE dispatcher and type checks against ``torch.cuda.FloatTensor``. This module
maps all of them to the CPU so that every parallel layout (TP, SP, PP, VPP, DP, the
distributed optimizer, EP, distributed checkpointing) runs under gloo on a laptop or CI.

It is installed only when CUDA is absent (see :func:`install`); on a GPU host it is a
no-op, so the real CUDA code paths are never altered.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from typing import Any, Callable

import torch
import torch.utils._device  # not imported by `import torch`; _patch_tensor_api needs it

from megatron_qwen.platform import collectives

log = logging.getLogger(__name__)

_INSTALLED = False
_CPU = torch.device("cpu")

# Tensor.type() answers for CPU tensors as if they lived on CUDA, because megatron's
# DDP and optimizer assert e.g. ``param.grad.type() == 'torch.cuda.FloatTensor'``.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
    torch.float64: "torch.cuda.DoubleTensor",
    torch.int64: "torch.cuda.LongTensor",
    torch.int32: "torch.cuda.IntTensor",
    torch.uint8: "torch.cuda.ByteTensor",
    torch.bool: "torch.cuda.BoolTensor",
}


def _is_cuda(device: Any) -> bool:
    """True for 'cuda', 'cuda:0', torch.device('cuda', i) and bare ints (CUDA ordinals)."""
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device is a CUDA ordinal (megatron passes torch.cuda.current_device()).
    return isinstance(device, int) and not isinstance(device, bool)


# Factories whose ``device=`` megatron sets to CUDA. Patched on the torch module rather
# than through a TorchFunctionMode because autograd runs backward() with function modes
# disabled, and megatron's custom autograd functions allocate CUDA buffers in backward.
_FACTORIES = (
    "empty", "zeros", "ones", "full", "arange", "tensor", "as_tensor", "randn", "rand",
    "randint", "randperm", "empty_like", "zeros_like", "ones_like", "full_like",
    "empty_strided", "linspace", "eye",
)
_TENSOR_FACTORIES = ("new_empty", "new_zeros", "new_ones", "new_full", "new_tensor")


def _redirect_device(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        # NOTE: pinned host memory only exists with an accelerator (torch raises without one);
        # megatron pins small index tensors before copying them to the GPU, e.g. the
        # context-parallel slice of the rotary embedding (get_pos_emb_on_this_cp_rank).
        if kwargs.get("pin_memory"):
            kwargs["pin_memory"] = False
        return fn(*args, **kwargs)

    return wrapper


def _tensor_to(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args = tuple(_CPU if _is_cuda(a) else a for a in args)
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        return fn(self, *args, **kwargs)

    return to


def _tensor_type(fn: Callable) -> Callable:
    @functools.wraps(fn)
    def type_(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs and self.dtype in _CUDA_TYPE_NAMES:
            return _CUDA_TYPE_NAMES[self.dtype]
        return fn(self, *args, **kwargs)

    return type_


def _patch_tensor_api() -> None:
    # NOTE: torch's ``with torch.device(...)`` context intercepts the factory functions it
    # collects (and caches) on first use; collect them before they are wrapped, or the
    # wrappers' inner calls escape it (meta-device model construction silently lands on CPU).
    torch.utils._device._device_constructors()
    for name in _FACTORIES:
        setattr(torch, name, _redirect_device(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        setattr(torch.Tensor, name, _redirect_device(getattr(torch.Tensor, name)))
    torch.Tensor.to = _tensor_to(torch.Tensor.to)
    torch.Tensor.type = _tensor_type(torch.Tensor.type)
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    torch.Tensor.record_stream = lambda self, stream: None


class _Stream:
    """CPU stand-in for ``torch.cuda.Stream``: all work is already synchronous."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def wait_stream(self, other: Any) -> None:
        pass

    def wait_event(self, event: Any) -> None:
        pass

    def record_event(self, event: Any = None) -> "_Event":
        return event if event is not None else _Event()

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True

    def __enter__(self) -> "_Stream":
        return self

    def __exit__(self, *exc: Any) -> None:
        pass


class _Event:
    """CPU stand-in for ``torch.cuda.Event``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def record(self, stream: Any = None) -> None:
        pass

    def wait(self, stream: Any = None) -> None:
        pass

    def synchronize(self) -> None:
        pass

    def query(self) -> bool:
        return True


_DEFAULT_STREAM = _Stream()


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    # The CPU default generator plays the role of the CUDA generator: the tracker's
    # fork() swaps its state exactly as it would swap the device generator's.
    return torch.get_rng_state()


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False) -> None:
    torch.set_rng_state(new_state)


def _manual_seed(seed: int) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: 0
    cuda.set_device = lambda device: None
    cuda.synchronize = lambda device=None: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _Stream
    cuda.Event = _Event
    cuda.current_stream = lambda device=None: _DEFAULT_STREAM
    cuda.default_stream = lambda device=None: _DEFAULT_STREAM
    cuda.stream = lambda stream=None: contextlib.nullcontext(stream)
    # Seeding the stand-in generator must be deterministic: megatron's RNG tracker
    # seeds each named state via torch.cuda.manual_seed and reads it back.
    cuda.manual_seed = _manual_seed
    # torch.manual_seed itself calls cuda.manual_seed_all after seeding the CPU.
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = _get_rng_state
    cuda.set_rng_state = _set_rng_state
    cuda.random.get_rng_state = _get_rng_state
    cuda.random.set_rng_state = _set_rng_state


class _DropForkWarning(logging.Filter):
    # The CPU generator *is* the stand-in CUDA generator, so megatron's check that
    # fork() leaves the CPU state untouched is expected to fire; it carries no signal here.
    def filter(self, record: logging.LogRecord) -> bool:
        return "CPU RNG state changed within GPU RNG context" not in record.getMessage()


def _patch_megatron() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    logging.getLogger(mrandom.__name__).addFilter(_DropForkWarning())

    mrandom._get_cuda_rng_state = _get_rng_state
    mrandom._set_cuda_rng_state = _set_rng_state
    # megatron-core 0.16.1 references te_general_gemm in the MoE router even when
    # Transformer Engine is absent (NameError); None selects its torch path.
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    _patch_moe_host_splits()
    _patch_uneven_gather()
    # megatron's fusions (SwiGLU, cross-entropy, bias-dropout-add) are torch.compile'd: on a
    # CPU inductor spends ~25 s per process building C++ kernels for no speed-up at these
    # sizes. Disabled, the same autograd functions run eagerly (same math, same saved tensors).
    import torch._dynamo

    torch._dynamo.config.disable = True
    _patch_yarn_init()


def host_tensor(tensor: Any, as_numpy: bool = False, record_stream: bool = False) -> Any:
    """CPU stand-in for megatron's ``maybe_move_tensor_to_cpu``.

    The original converts only CUDA tensors, so on CPU the alltoall dispatcher's
    ``input_splits``/``output_splits`` stay tensors and ``all_to_all_single`` rejects
    them as split sizes. Here every tensor is treated as already on the host and, like
    the CUDA path, returned as a numpy array when ``as_numpy`` is set. ``record_stream``
    only keeps the original signature: there is no side stream on the CPU.
    """
    if torch.is_tensor(tensor) and as_numpy:
        return tensor.detach().cpu().numpy()
    return tensor


def _patch_moe_host_splits() -> None:
    from megatron.core.transformer.moe import moe_utils, token_dispatcher

    # token_dispatcher imported the function by name, so both bindings are replaced.
    moe_utils.maybe_move_tensor_to_cpu = host_tensor
    token_dispatcher.maybe_move_tensor_to_cpu = host_tensor


def _uneven_gather(fn: Callable) -> Callable:
    """Wraps megatron's ``_gather_along_first_dim`` so that uneven splits work on gloo.

    With expert tensor parallelism the alltoall dispatcher gathers a different number of
    tokens from each rank (``output_split_sizes``); gloo's ``all_gather`` refuses tensors
    of different shapes. Each rank pads its rows to the longest split, the equal-sized
    gather runs, and the padding is cut away again.
    """

    @functools.wraps(fn)
    def gather(input_: torch.Tensor, group: Any, output_split_sizes: Any = None,
               use_global_buffer: bool = False) -> torch.Tensor:
        if output_split_sizes is None or group.size() == 1:
            return fn(input_, group, output_split_sizes, use_global_buffer)
        sizes = [int(n) for n in output_split_sizes]
        longest = max(sizes)
        padded = input_.new_zeros((longest, *input_.shape[1:]))  # [max_tokens, h]
        padded[: input_.shape[0]] = input_
        gathered = input_.new_empty((longest * len(sizes), *input_.shape[1:]))
        collectives.all_gather_into_tensor(gathered, padded, group=group)
        return torch.cat([chunk[:n] for chunk, n in zip(gathered.chunk(len(sizes)), sizes)])

    return gather


def _patch_uneven_gather() -> None:
    from megatron.core.tensor_parallel import mappings

    mappings._gather_along_first_dim = _uneven_gather(mappings._gather_along_first_dim)


def _patch_yarn_init() -> None:
    """YaRN's rotary embedding builds its frequencies under ``torch.device(current_device())``,
    which is ``torch.device(0)``: an accelerator device that cannot even be named without one.
    On the CPU its own ``use_cpu_initialization`` path is the right one."""
    from megatron.core.models.common.embeddings import yarn_rotary_pos_embedding as yarn

    init = yarn.YarnRotaryEmbedding.__init__

    @functools.wraps(init)
    def cpu_init(self, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **{**kwargs, "use_cpu_initialization": True})

    yarn.YarnRotaryEmbedding.__init__ = cpu_init


def install() -> bool:
    """Activate the CPU compatibility layer if CUDA is unavailable.

    Idempotent. Returns True when the layer is active after the call.
    """
    global _INSTALLED
    if _INSTALLED:
        return True
    if torch.cuda.is_available():
        return False
    _patch_tensor_api()
    _patch_torch_cuda()
    _patch_megatron()
    _INSTALLED = True
    log.info("CUDA unavailable: megatron-core CUDA requests are mapped to the CPU")
    return True


def is_active() -> bool:
    """Whether the compatibility layer is installed in this process."""
    return _INSTALLED
