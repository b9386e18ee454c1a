"""Device queries that work with and without CUDA."""

from __future__ import annotations

import resource

import torch


def current_device() -> torch.device:
    """This rank's compute device."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def peak_memory_gb() -> float:
    """Peak allocated GPU memory, or the process's peak resident memory on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # ru_maxrss is KiB on Linux
