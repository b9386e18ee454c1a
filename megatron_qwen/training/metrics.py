"""Training metrics: console, ``metrics.jsonl``, wandb and TensorBoard, on one rank."""

from __future__ import annotations

import functools
import json
import logging
import os
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron_qwen.config.schema import Config

log = logging.getLogger(__name__)

# Dense (non-sparse) bf16/fp16 tensor-core peak TFLOP/s by device-name fragment, most specific
# first (torch.cuda.get_device_name(): "NVIDIA H100 80GB HBM3" is the SXM part, "NVIDIA H100
# PCIe", "NVIDIA H100 NVL", "NVIDIA H200", "NVIDIA GH200 480GB"). NVIDIA data sheets; FP8 on
# Hopper and Ada is twice these.
GPU_PEAK_TFLOPS = (
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("GH200", 989.0),
    ("H200", 989.0),
    ("H100", 989.0),  # SXM5 (the name carries no "SXM")
    ("H800", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("A10", 125.0),
)
_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def gpu_peak_tflops(device_name: str, fp8: bool = False) -> Optional[float]:
    """The table's dense peak for a CUDA device name, doubled for FP8; None if unknown."""
    upper = device_name.upper()
    for fragment, tflops in GPU_PEAK_TFLOPS:
        if fragment in upper:
            return tflops * (2 if fp8 else 1)
    return None


@functools.lru_cache(maxsize=None)
def measure_cpu_tflops(dtype: str) -> float:
    """Achievable ``dtype`` matmul TFLOP/s of this CPU process (a 0.2 s probe): the roofline
    against which CPU MFU is reported, since CPUs publish no comparable peak. Measured per
    dtype because bf16 and fp32 matmuls run at very different speeds on most CPUs."""
    gen = torch.Generator().manual_seed(0)  # private: the training RNG stream stays untouched
    a = torch.randn(512, 512, generator=gen).to(_TORCH_DTYPES[dtype])
    b = torch.randn(512, 512, generator=gen).to(_TORCH_DTYPES[dtype])
    torch.mm(a, b)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        torch.mm(a, b)
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e12


def peak_tflops(cfg: Config) -> Optional[float]:
    """Per-device peak for MFU, or None when unknown (MFU is then reported as unavailable).

    ``cluster.peak_tflops`` is the dense bf16 peak and, like the built-in table, counts twice
    for FP8 runs; without it the GPU is looked up by name, and a CPU is measured in the run's
    own dtype.
    """
    fp8 = cfg.precision.fp8 is not None
    if cfg.cluster.peak_tflops:
        return float(cfg.cluster.peak_tflops) * (2 if fp8 else 1)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        peak = gpu_peak_tflops(name, fp8)
        if peak is None:
            log.warning("unknown GPU %r: set cluster.peak_tflops (dense bf16) for MFU", name)
        return peak
    return measure_cpu_tflops(cfg.precision.dtype)


class MetricsWriter:
    """Fans one metrics record out to every configured sink. Create on the logging rank only.

    ``resume_step``: the iteration training continues from. Records of later steps, logged
    by an attempt that died before its next checkpoint, are dropped (JSONL rewritten,
    TensorBoard purged from that step), so every step appears once after a resume.
    """

    def __init__(self, cfg: Config, run_dir: Path, config_dict: Dict[str, Any], resume_step: int = 0) -> None:
        self.cfg, self.run_dir = cfg, run_dir
        self._open_files(resume_step)
        self.wandb = self._open_wandb(cfg, run_dir, config_dict)

    def _open_files(self, resume_step: int) -> None:
        # One JSONL per record kind: training steps and validation passes.
        paths = {"train": self.run_dir / "metrics.jsonl", "valid": self.run_dir / "eval.jsonl"}
        for path in paths.values():
            drop_records_after(path, resume_step)
        self.jsonl = {kind: open(path, "a", buffering=1) for kind, path in paths.items()}
        self.tb = None
        if self.cfg.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # Readers discard the events of earlier files from purge_step on.
            self.tb = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"), purge_step=resume_step + 1)

    def rewind(self, step: int) -> None:
        """Training went back to ``step`` (a rollback): drops the later records, as on resume.

        NOTE: wandb keeps what it logged for those steps (it ignores steps at or below its
        last one); they are replayed bit-exactly up to the skipped batch.
        """
        self._close_files()
        self._open_files(step)

    @staticmethod
    def _open_wandb(cfg: Config, run_dir: Path, config_dict: Dict[str, Any]):
        if cfg.logging.wandb_mode == "disabled":
            return None
        import wandb

        os.environ.setdefault("WANDB_SILENT", "true")
        return wandb.init(project=cfg.logging.wandb_project, entity=cfg.logging.wandb_entity,
                          mode=cfg.logging.wandb_mode, dir=str(run_dir), config=config_dict,
                          name=run_dir.name, resume="allow", id=_wandb_id(run_dir))

    def write(self, record: Dict[str, Any], prefix: str = "train") -> None:
        """Writes one record (must contain ``step``) to all sinks; prefix is train or valid."""
        self.jsonl[prefix].write(json.dumps(record) + "\n")
        step = record["step"]
        scalars = {k: v for k, v in record.items() if isinstance(v, (int, float)) and k != "step"}
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(f"{prefix}/{key}", value, step)
        if self.wandb is not None:
            self.wandb.log({f"{prefix}/{k}": v for k, v in scalars.items()}, step=step)

    def _close_files(self) -> None:
        for f in self.jsonl.values():
            f.close()
        if self.tb is not None:
            self.tb.close()

    def close(self) -> None:
        self._close_files()
        if self.wandb is not None:
            self.wandb.finish()


def drop_records_after(path: Path, step: int) -> None:
    """Rewrites the JSONL file ``path`` without records of steps after ``step`` (atomically)."""
    if not path.is_file():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = [line for line in lines if line.strip() and _step_of(line) <= step]
    if len(kept) == len(lines):
        return
    log.info("%s: dropping %d records after step %d (logged after the checkpoint resumed from)",
             path, len(lines) - len(kept), step)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(kept))
    os.replace(tmp, path)


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")  # a line torn by a crash mid-write


def _wandb_id(run_dir: Path) -> str:
    # A stable id per run directory lets a requeued job continue the same wandb run.
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def format_line(record: Dict[str, Any], total_iters: int) -> str:
    """Readable one-liner for the console."""
    parts = [f"step {record['step']}/{total_iters}", f"loss {_fmt(record['loss'], '.4f')}",
             f"lr {record['lr']:.2e}", f"gnorm {_fmt(record['grad_norm'], '.3f')}",
             f"{record['tokens_per_s'] / 1e3:.1f}k tok/s", f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
             f"MFU {format_mfu(record['mfu'])}", f"mem {record['peak_mem_gb']:.2f} GB",
             f"skipped {record['skipped_iters']}"]
    return " | ".join(parts)


def format_mfu(mfu: Optional[float]) -> str:
    """``41.3%``, or ``n/a`` when the peak is unknown."""
    return _fmt(None if mfu is None else 100 * mfu, ".1f") + ("" if mfu is None else "%")


def format_scalars(values: Dict[str, Optional[float]]) -> str:
    """``name value`` pairs for the console, e.g. ``rewards/accuracy 0.7500 | rewards/margin 0.1230``."""
    return " | ".join(f"{name} {_fmt(value, '.4f')}" for name, value in values.items())


def _fmt(value: Optional[float], spec: str) -> str:
    return "n/a" if value is None else format(value, spec)  # None: every step of the window skipped


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak: Optional[float]) -> Dict[str, Optional[float]]:
    """Tokens/s, model TFLOP/s per device and MFU (None without a peak) for ``tokens`` in ``seconds``."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops / peak if peak else None}
