"""Model construction and the metrics a run reports."""

import json
import subprocess
import sys

import pytest

from megatron_qwen.config.params import count_parameters
from megatron_qwen.config.store import compose_config
from tests.helpers import REPO, TINY, run_cli, train_command

BUILD_AND_COUNT = """
import torch
from megatron_qwen.config import validate
from megatron_qwen.config.store import compose_config
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.model.build import build_model
from megatron_qwen.platform.launch import detect_process_env, init_process_group
from megatron_qwen.platform.parallel import destroy, init_model_parallel
cfg = validate(compose_config(["model=qwen2_5_0_5b"]), 1)
init_process_group(detect_process_env())
init_model_parallel(cfg)
with torch.no_grad():
    chunks = build_model(cfg.model, to_transformer_config(cfg), seed=1)
print(sum(p.numel() for c in chunks for p in c.parameters()))
destroy()
"""


@pytest.mark.slow
def test_qwen2_5_0_5b_builds_on_cpu_with_the_published_parameter_count():
    proc = subprocess.run([sys.executable, "-c", BUILD_AND_COUNT], cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    built = int(proc.stdout.strip().splitlines()[-1])
    expected = count_parameters(compose_config(["model=qwen2_5_0_5b"]).model).total
    assert built == expected == 494_032_768  # tied: no separate output layer


def test_metrics_reach_jsonl_tensorboard_and_wandb_offline(tmp_path):
    args = [*TINY, "train.train_iters=4", "logging.log_interval=2", "logging.wandb_mode=offline",
            "logging.tensorboard=true", "train.eval_interval=2", "train.eval_iters=1", f"run_dir={tmp_path}"]
    proc = run_cli(train_command(args), env={"WANDB_MODE": "offline"})
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tflops_per_device",
                "peak_mem_gb", "skipped_iters"} <= set(r)
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 and r["grad_norm"] > 0
    evals = [json.loads(line) for line in (tmp_path / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2, 4] and all(e["val_loss"] > 0 for e in evals)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))
    assert "step 4/4 | loss" in proc.stdout + proc.stderr  # console one-liner
    assert (tmp_path / "config.yaml").read_text().count("qwen2_5_tiny") >= 1
    assert (tmp_path / "max_requeues").read_text() == "0\n"  # cluster.max_requeues, for slurm/train.sbatch
    assert "switches: spec=" in proc.stdout + proc.stderr  # the resolved switches, logged at start
