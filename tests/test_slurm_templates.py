"""The sbatch templates: valid bash, the #SBATCH contract, and presets that compose."""

from __future__ import annotations

import subprocess

import pytest

from megatron_qwen.training.signals import RESUMABLE_EXIT_CODE
from tests.slurm_support import MODEL_TEMPLATES, SLURM_DIR, TEMPLATES, parse_template


def test_every_expected_template_exists():
    assert {"pretrain_72b.sh", "pretrain_7b.sh", "sft_7b.sh", "train.sbatch", "pretrain_tiny.sh"} <= set(TEMPLATES)


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_is_valid_bash(name):
    proc = subprocess.run(["bash", "-n", str(SLURM_DIR / name)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("name", TEMPLATES)
def test_template_declares_a_preemptible_job(name):
    options = parse_template(name).options
    for key in ("--job-name", "--nodes", "--ntasks-per-node", "--time", "--output"):
        assert options.get(key), f"{name} lacks #SBATCH {key}"
    assert "--requeue" in options, f"{name} must be requeueable so that a preempted job resumes"
    assert options["--open-mode"] == "append", "a requeued job must append to its log, not truncate it"
    signal, _, seconds = options["--signal"].partition("@")
    assert signal == "USR1" and int(seconds) >= 60, "the trainer's exit signal must come before the time limit"
    assert "%j" in options["--output"], "logs must be per job"


@pytest.mark.parametrize("name", [t for t in TEMPLATES if t != "pretrain_tiny.sh"])
def test_gpu_templates_run_one_task_per_gpu_on_whole_nodes(name):
    options = parse_template(name).options
    assert options["--ntasks-per-node"] == options["--gpus-per-node"] == "8"
    assert "--exclusive" in options


@pytest.mark.parametrize("name", MODEL_TEMPLATES)
def test_model_templates_delegate_to_the_generic_launcher(name):
    code = [line for line in (SLURM_DIR / name).read_text().splitlines() if line and not line.startswith("#")]
    assert len(code) == 1, f"{name}: only the #SBATCH header and one launch line, got {code}"
    assert code[0].startswith("exec bash slurm/train.sbatch experiment=") and code[0].endswith('"$@"')


def test_generic_launcher_requeues_on_the_trainers_resumable_exit_code():
    text = (SLURM_DIR / "train.sbatch").read_text()
    assert f"RESUMABLE_EXIT_CODE={RESUMABLE_EXIT_CODE}" in text
    assert 'scontrol requeue "$SLURM_JOB_ID"' in text
    assert "--kill-on-bad-exit=0" in text
    assert "export CUDA_DEVICE_MAX_CONNECTIONS=1" in text
    assert "--container-image" in text
