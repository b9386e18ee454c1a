"""Which optional GPU libraries this process can actually use, decided once.

A package being *found* is not enough: containers often ship a Transformer Engine whose
CUDA libraries do not load, and choosing the TE spec from ``find_spec`` then fails deep
inside the model build. Like megatron's ``HAVE_TE`` flags, the answer here comes from a
successful import, and every caller (``validate()``, the translation to megatron's
configs, the layer-spec builder) reads the same cached :func:`detect` result.

Nothing here starts a process group; importing Transformer Engine imports torch.

The file depends on the standard library only: the container build (slurm/container/Dockerfile)
copies it alone and runs it as its smoke test (:func:`main`), so the image is checked with the
same imports the trainer will use.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import logging
import sys
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Features:
    """Optional libraries that imported successfully in this process."""

    te: bool = False  # transformer_engine.pytorch
    te_version: Optional[str] = None
    apex: bool = False  # apex's fused layer norm (fused_layer_norm_cuda)
    # apex's fused_weight_gradient_mlp_cuda: megatron's own linear layers (the output layer,
    # also under the TE spec) need it for gradient-accumulation fusion.
    apex_wgrad: bool = False
    apex_persist_ln: bool = False  # apex.contrib.layer_norm (megatron's persistent LayerNorm)
    softmax_kernels: bool = False  # scaled_(upper_triang_)masked_softmax_cuda (apex or megatron-LM)
    # transformer_engine.pytorch.module.base.initialize_ub with a torch.distributed bootstrap
    # (TE >= 1.9): userbuffers for overlapping TP communication with GEMMs.
    te_userbuffers: bool = False
    # A fused multi-tensor Adam (TE's, else apex's); without one megatron's optimizer falls back
    # to torch.optim.AdamW with a warning.
    fused_adam: bool = False

    def te_at_least(self, version: str) -> bool:
        """Whether Transformer Engine is present at ``version`` or newer (e.g. '2.3')."""
        return self.te and _version_tuple(self.te_version) >= _version_tuple(version)


NONE = Features()  # nothing optional: the local spec and the unfused PyTorch paths


def _version_tuple(version: Optional[str]) -> Tuple[int, ...]:
    parts = []
    for piece in (version or "0").split("+")[0].split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _imports(module: str) -> Tuple[bool, Optional[object]]:
    """(True, module) when ``module`` imports; (False, None) on any failure, logged once."""
    try:
        return True, importlib.import_module(module)
    except ImportError as err:
        if err.name is not None and module.startswith(err.name):
            return False, None  # simply not installed
        log.warning("%s is installed but does not import (%s); not using it", module, err)
    except Exception as err:  # noqa: BLE001 (a broken CUDA library raises OSError/RuntimeError)
        log.warning("%s is installed but does not import (%s: %s); not using it", module,
                    type(err).__name__, err)
    return False, None


def probe() -> Features:
    """Imports the optional libraries now (uncached; :func:`detect` is the cached answer)."""
    te, te_module = _imports("transformer_engine.pytorch")
    version = None
    if te:
        version = str(getattr(importlib.import_module("transformer_engine"), "__version__", None)
                      or getattr(te_module, "__version__", "0"))
    return Features(te=te, te_version=version, apex=_imports("fused_layer_norm_cuda")[0],
                    apex_wgrad=_imports("fused_weight_gradient_mlp_cuda")[0],
                    apex_persist_ln=_imports("apex.contrib.layer_norm.layer_norm")[0],
                    softmax_kernels=all(_imports(m)[0] for m in _SOFTMAX_KERNELS),
                    te_userbuffers=te and _has_userbuffers(version),
                    fused_adam=_has_attr("transformer_engine.pytorch.optimizers", "FusedAdam")
                    or _has_attr("apex.optimizers", "FusedAdam"))


_SOFTMAX_KERNELS = ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda")


def _has_userbuffers(te_version: Optional[str]) -> bool:
    if _version_tuple(te_version) < (1, 9):  # older TE bootstraps userbuffers over MPI only
        return False
    ok, base = _imports("transformer_engine.pytorch.module.base")
    return ok and hasattr(base, "initialize_ub")


def _has_attr(module: str, name: str) -> bool:
    ok, found = _imports(module)
    return ok and hasattr(found, name)


@functools.lru_cache(maxsize=1)
def detect() -> Features:
    """The features of this process, probed on first use and then fixed."""
    return probe()


# What the H100 presets run on (cluster=slurm_h100 refuses to start without them, see
# config.validate.missing_fast_path): the image's smoke test requires every one.
FAST_PATH = ("te", "apex_wgrad", "te_userbuffers", "fused_adam")


def missing(features: Features, required: Sequence[str]) -> List[str]:
    """The names in ``required`` that ``features`` lacks."""
    return [name for name in required if not getattr(features, name)]


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Prints what imports here; with ``--require-fast-path``, exit 1 unless all of :data:`FAST_PATH` does."""
    parser = argparse.ArgumentParser(description="Which optional GPU libraries import in this environment.")
    parser.add_argument("--require-fast-path", action="store_true",
                        help=f"exit 1 unless {', '.join(FAST_PATH)} all import (the container build's smoke test)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")  # why an installed library does not import
    found = probe()
    for field in dataclasses.fields(found):
        print(f"{field.name}: {getattr(found, field.name)}")
    absent = missing(found, FAST_PATH) if args.require_fast_path else []
    if absent:
        print(f"error: the fast path does not import in this image (missing: {', '.join(absent)}), so "
              "cluster=slurm_h100 runs would refuse to start; build on an NGC PyTorch image (25.03 or newer), "
              "which ships Transformer Engine and apex", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
