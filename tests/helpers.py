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


def metric(records: List[Dict], key: str) -> Dict[int, float]:
    """step -> ``key`` for the records that have it."""
    return {r["step"]: r[key] for r in records if key in r}


def assert_close(got: List[Dict], ref: List[Dict], tolerances: Dict[str, float], label: str = "") -> None:
    """Every step of ``ref`` has the same metrics in ``got`` within relative ``tolerances``
    (e.g. ``{"loss": 1e-6, "grad_norm": 1e-6}``); reports the worst step of each metric."""
    for key, rel in tolerances.items():
        expected, actual = metric(ref, key), metric(got, key)
        assert sorted(actual) == sorted(expected), f"{label} {key}: steps {sorted(actual)} vs {sorted(expected)}"
        worst = max(expected, key=lambda s: abs(actual[s] - expected[s]) / abs(expected[s]))
        err = abs(actual[worst] - expected[worst]) / abs(expected[worst])
        assert err <= rel, f"{label} {key} step {worst}: {actual[worst]} vs {expected[worst]} (rel {err:.2e} > {rel:g})"


def checkpoint_weights(iter_dir: Path) -> Dict[str, "torch.Tensor"]:
    """The model tensors of a megatron torch_dist checkpoint, by sharded key, read in one process."""
    import tempfile

    import torch
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    with tempfile.TemporaryDirectory() as tmp:
        dcp_to_torch_save(str(iter_dir), f"{tmp}/all.pt")
        state = torch.load(f"{tmp}/all.pt", weights_only=False)
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor) and not k.startswith(("optimizer.", "rng"))}


def assert_losses_close(got: Dict[int, float], ref: Dict[int, float], steps=None, rel: float = 1e-4,
                        label: str = "") -> None:
    """Per-step loss agreement within ``rel`` (relative) on ``steps`` (default: all of ``ref``)."""
    for step in steps if steps is not None else sorted(ref):
        assert abs(got[step] - ref[step]) <= rel * abs(ref[step]), f"{label} step {step}: {got[step]} vs {ref[step]}"
