"""tools/gpu_check.py is ready for the first GPU machine: every part's logic runs here on the CPU (gloo)."""

import json
import math
import sys

import pytest

from tests.helpers import REPO, run_cli

PARTS = ["init", "train", "sft_packed", "dpo_precompute", "dpo_model_sft", "grpo", "long_context", "resume",
         "generate", "verify"]


@pytest.mark.slow
def test_gpu_check_logic_passes_on_cpu_for_every_stage():
    proc = run_cli([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--allow-cpu"], timeout=1200)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [], summary
    checks = summary["checks"]
    assert list(checks) == PARTS and summary["backend"] == "gloo"  # one entry per part, bench left out on CPU
    init = checks["init"]["qwen2_5_tiny"]
    assert init["spec"] == "local" and init["norms_all_one"] and init["norms"] == 2 * 4 + 1
    assert checks["train"]["last_loss"] < checks["train"]["first_loss"] - 0.05
    assert checks["sft_packed"]["last_loss"] < checks["sft_packed"]["first_loss"] - 0.5
    assert checks["dpo_precompute"]["first_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert checks["dpo_precompute"]["tables"] == 2  # train and validation pairs
    assert checks["dpo_model_sft"]["first_loss"] > math.log(2) + 0.5
    assert checks["grpo"]["rollout_tokens_per_s"] > 0
    assert checks["resume"]["max_rel_diff"] == 0.0  # bit-exact on CPU
    assert checks["verify"]["max_abs_diff"] < 0.05
    assert all("over_budget" not in c for c in checks.values())  # budgets apply on GPUs only


def test_gpu_check_refuses_to_run_without_a_gpu_and_names_bad_parts():
    proc = run_cli([sys.executable, str(REPO / "tools" / "gpu_check.py")], check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device")
    proc = run_cli([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--allow-cpu", "--parts", "dpo,grpo"],
                   check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: unknown part(s) ['dpo']"), proc.stderr


def test_parts_keep_the_callers_pythonpath(monkeypatch):
    import importlib.util
    import os

    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "tools" / "gpu_check.py")
    gpu_check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", gpu_check)  # its dataclass looks itself up there
    spec.loader.exec_module(gpu_check)
    monkeypatch.setenv("PYTHONPATH", "/tmp/site")  # where a GPU host's carried wheels are installed
    assert gpu_check._env()["PYTHONPATH"].split(os.pathsep) == [str(REPO), "/tmp/site"]
