"""tools/gpu_check.py is ready for the first GPU machine: its logic runs here on the CPU."""

import json
import sys

import pytest

from tests.helpers import REPO, run_cli


@pytest.mark.slow
def test_gpu_check_logic_passes_on_cpu():
    proc = run_cli([sys.executable, str(REPO / "tools" / "gpu_check.py"), "--allow-cpu", "--quick"], timeout=900)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["failed"] == [], summary
    init = summary["checks"]["init"]["qwen2_5_tiny"]
    assert init["spec"] == "local" and init["norms_all_one"] and init["norms"] == 2 * 4 + 1
    train = summary["checks"]["train"]
    assert train["last_loss"] < train["first_loss"] - 0.05
    assert summary["checks"]["verify"]["max_abs_diff"] < 0.05


def test_gpu_check_refuses_to_run_without_a_gpu():
    proc = run_cli([sys.executable, str(REPO / "tools" / "gpu_check.py")], check=False, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: no CUDA device")
