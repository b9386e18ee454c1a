"""Shared test utilities: run the real CLI (optionally under torchrun) and read its metrics."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

REPO = Path(__file__).resolve().parent.parent

# Small, fast defaults for every CLI run in tests (fp32 on CPU).
QUIET = ["logging.wandb_mode=disabled", "logging.tensorboard=false", "logging.progress_bar=false"]
TINY = ["model=qwen2_5_tiny", "model.vocab_size=256", "data=mock", "train.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=8", "train.eval_interval=0", "checkpoint.save_interval=null",
        "checkpoint.save_at_end=false", "logging.log_interval=1", "optim.warmup_iters=2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_command(overrides: Sequence[str], nproc: int = 1, module: str = "megatron_qwen.train") -> List[str]:
    """``python -m megatron_qwen.train`` or the same under torchrun with ``nproc`` ranks."""
    if nproc == 1:
        return [sys.executable, "-m", module, *overrides]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
            "--master-port", str(free_port()), "-m", module, *overrides]


def run_cli(cmd: Sequence[str], timeout: int = 600, env: Optional[Dict[str, str]] = None,
            check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command from the repo root; on failure the assertion shows its output tail."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env or {})}
    proc = subprocess.run(list(cmd), cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def run_train(run_dir: Path, overrides: Sequence[str] = (), nproc: int = 1, timeout: int = 600,
              tiny: bool = True) -> List[Dict]:
    """Trains with the CLI and returns the records of ``run_dir/metrics.jsonl``."""
    args = [*(TINY if tiny else []), *QUIET, *overrides, f"run_dir={run_dir}"]
    run_cli(train_command(args, nproc), timeout=timeout)
    return read_metrics(run_dir)


def read_metrics(run_dir: Path, name: str = "metrics.jsonl") -> List[Dict]:
    path = Path(run_dir) / name
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def losses(records: List[Dict]) -> Dict[int, float]:
    """step -> loss for training records."""
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def assert_losses_close(got: Dict[int, float], ref: Dict[int, float], steps=None, rel: float = 1e-4,
                        label: str = "") -> None:
    """Per-step loss agreement within ``rel`` (relative) on ``steps`` (default: all of ``ref``)."""
    for step in steps if steps is not None else sorted(ref):
        assert abs(got[step] - ref[step]) <= rel * abs(ref[step]), f"{label} step {step}: {got[step]} vs {ref[step]}"
