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

# Dense peak TFLOP/s per device by name fragment (bf16/fp16; fp8 doubles on Hopper).
_PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0}


@functools.lru_cache(maxsize=1)
def _measure_cpu_tflops() -> float:
    """Achievable fp32 matmul TFLOP/s of this CPU process (a 0.2 s probe): the roofline
    against which CPU MFU is reported, since CPUs publish no comparable peak."""
    a, b = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, b)
    start, n = time.perf_counter(), 0
    while time.perf_counter() - start < 0.2:
        torch.mm(a, b)
        n += 1
    return 2 * 512**3 * n / (time.perf_counter() - start) / 1e12


def peak_tflops(cfg: Config) -> float:
    """Per-device peak: the config's value, else looked up from the GPU name, else measured."""
    if cfg.cluster.peak_tflops:
        return float(cfg.cluster.peak_tflops)
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        for key, value in _PEAK_TFLOPS.items():
            if key in name:
                return value * (2 if cfg.precision.fp8 and key in ("H100", "H200") else 1)
        log.warning("unknown GPU %r: set cluster.peak_tflops for MFU", name)
        return float("nan")
    return _measure_cpu_tflops()


class MetricsWriter:
    """Fans one metrics record out to every configured sink. Create on the logging rank only."""

    def __init__(self, cfg: Config, run_dir: Path, config_dict: Dict[str, Any]) -> None:
        # One JSONL per record kind: training steps and validation passes.
        self.jsonl = {"train": open(run_dir / "metrics.jsonl", "a", buffering=1),
                      "valid": open(run_dir / "eval.jsonl", "a", buffering=1)}
        self.tb = self._open_tensorboard(cfg, run_dir)
        self.wandb = self._open_wandb(cfg, run_dir, config_dict)

    @staticmethod
    def _open_tensorboard(cfg: Config, run_dir: Path):
        if not cfg.logging.tensorboard:
            return None
        from torch.utils.tensorboard import SummaryWriter

        return SummaryWriter(log_dir=str(run_dir / "tensorboard"))

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

    def close(self) -> None:
        for f in self.jsonl.values():
            f.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


def _wandb_id(run_dir: Path) -> str:
    # A stable id per run directory lets a requeued job continue the same wandb run.
    path = run_dir / "wandb_id.txt"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()


def format_line(record: Dict[str, Any], total_iters: int) -> str:
    """Readable one-liner for the console."""
    parts = [f"step {record['step']}/{total_iters}", f"loss {record['loss']:.4f}",
             f"lr {record['lr']:.2e}", f"gnorm {record['grad_norm']:.3f}",
             f"{record['tokens_per_s'] / 1e3:.1f}k tok/s", f"{record['tflops_per_device']:.2f} TFLOP/s/dev",
             f"MFU {100 * record['mfu']:.1f}%", f"mem {record['peak_mem_gb']:.2f} GB",
             f"skipped {record['skipped_iters']}"]
    return " | ".join(parts)


def format_scalars(values: Dict[str, float]) -> str:
    """``name value`` pairs for the console, e.g. ``rewards/accuracy 0.7500 | rewards/margin 0.1230``."""
    return " | ".join(f"{name} {value:.4f}" for name, value in values.items())


def throughput(tokens: int, seconds: float, flops_per_token: float, world_size: int,
               peak: float) -> Dict[str, float]:
    """Tokens/s, model TFLOP/s per device and MFU for ``tokens`` processed in ``seconds``."""
    tokens_per_s = tokens / max(seconds, 1e-9)
    tflops = tokens_per_s * flops_per_token / world_size / 1e12
    return {"tokens_per_s": tokens_per_s, "tflops_per_device": tflops, "mfu": tflops / peak}
