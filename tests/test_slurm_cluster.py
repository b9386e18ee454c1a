"""End to end on a real one-node SLURM cluster started by tests/slurm/start_cluster.sh.

The cluster is started by the ``cluster_env`` fixture (tests/conftest.py), installing Debian's
slurm-wlm and munge when missing; it says when these tests skip and when they fail instead.
"""

from __future__ import annotations

import math
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest
import yaml

from tests.helpers import QUIET, REPO, losses, read_metrics, run_cli, train_command
from tests.slurm_support import job_state, parse_template, wait_for_file_lines, wait_for_job

pytestmark = pytest.mark.slow

# The template as is, minus evaluation and periodic saves (speed; the final save stays).
FAST = ["train.eval_interval=0", "checkpoint.save_interval=null", *QUIET]
TINY_ITERS = 40  # conf/experiment/pretrain_tiny.yaml


def sbatch(template: str, run_dir: Path, env: Dict[str, str], overrides: List[str], wait: bool) -> str:
    """Submits a template from the repo root with its own RUN_DIR and log; returns the job id."""
    cmd = ["sbatch", "--parsable", f"--output={run_dir.parent}/%x-%j.out", *(["--wait"] if wait else []),
           f"slurm/{template}", *overrides]
    proc = run_cli(cmd, env={**env, "RUN_DIR": str(run_dir)}, timeout=900, check=False)
    job_id = (proc.stdout.split() or [""])[0].split(";")[0]
    assert proc.returncode == 0, f"sbatch exited {proc.returncode}: {proc.stderr}\n{job_log(run_dir, job_id)[-6000:]}"
    return job_id


def job_log(run_dir: Path, job_id: str) -> str:
    logs = list(run_dir.parent.glob(f"*-{job_id}.out")) if job_id else []
    return logs[0].read_text() if logs else "(no job log)"


@pytest.fixture(scope="module")
def uninterrupted(cluster_env, tmp_path_factory) -> Path:
    """pretrain_tiny.sh run to the end with sbatch --wait; its run directory."""
    run_dir = tmp_path_factory.mktemp("tiny") / "run"
    sbatch("pretrain_tiny.sh", run_dir, cluster_env, FAST, wait=True)
    return run_dir


def test_tiny_template_trains_at_tp2_on_two_tasks(uninterrupted):
    config = yaml.safe_load((uninterrupted / "config.yaml").read_text())
    assert (config["parallel"]["tp"], config["parallel"]["dp"]) == (2, 1)  # validated for SLURM_NTASKS=2
    assert parse_template("pretrain_tiny.sh").world_size == 2
    curve = losses(read_metrics(uninterrupted))
    assert sorted(curve) == list(range(1, TINY_ITERS + 1))
    assert all(math.isfinite(v) for v in curve.values()) and curve[TINY_ITERS] < curve[1]
    assert (uninterrupted / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == str(TINY_ITERS)
    assert (uninterrupted / "checkpoints" / f"iter_{TINY_ITERS:07d}" / "metadata.json").is_file()


def test_signalled_job_saves_requeues_and_resumes_without_losing_a_step(cluster_env, uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    job = sbatch("pretrain_tiny.sh", run_dir, cluster_env, FAST, wait=False)
    wait_for_file_lines(run_dir / "metrics.jsonl", 1, job, cluster_env)  # signal early: 39 steps of margin
    subprocess.run(["scancel", "--signal=USR1", job], env=cluster_env, check=True)
    state = wait_for_job(job, cluster_env)
    log = job_log(run_dir, job)
    assert (state["JobState"], state["Restarts"]) == ("COMPLETED", "1"), log[-3000:]
    assert "requeueing job" in log and f"job {job} (restart 1)" in log
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
    assert len(saved) == 2 and saved[-1] == f"iter_{TINY_ITERS:07d}", saved  # the signal's save, the final one
    steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
    assert steps == list(range(1, TINY_ITERS + 1)), "every step trained exactly once across the requeue"
    assert losses(read_metrics(run_dir)) == losses(read_metrics(uninterrupted))


def _seconds(slurm_time: str) -> int:
    """SLURM's [D-]HH:MM:SS as seconds."""
    days, _, clock = slurm_time.rpartition("-")
    h, m, s = (int(x) for x in clock.split(":"))
    return int(days or 0) * 86400 + h * 3600 + m * 60 + s


def test_a_crashed_rank_ends_the_job_within_the_fail_fast_time(cluster_env, tmp_path):
    # Rank 1 dies at start-up; rank 0 would wait for it in the rendezvous for the whole
    # process-group timeout (30 min here). srun --wait ends it FAIL_FAST_SECONDS later.
    crash = tmp_path / "python_rank1_crashes"
    crash.write_text(f"#!/bin/bash\nif [[ $SLURM_PROCID == 1 ]]; then echo 'rank 1: simulated crash' >&2; exit 3; fi\n"
                     f"exec {sys.executable} \"$@\"\n")
    crash.chmod(0o755)
    fail_fast = 10
    env = {**cluster_env, "PYTHON": str(crash), "FAIL_FAST_SECONDS": str(fail_fast)}
    start = time.monotonic()
    job = sbatch("pretrain_tiny.sh", tmp_path / "run", env, FAST, wait=False)
    state = wait_for_job(job, env, timeout=300)
    log = job_log(tmp_path / "run", job)
    assert state["JobState"] == "FAILED" and state["Restarts"] == "0", log[-3000:]
    assert "rank 1: simulated crash" in log and "requeueing" not in log
    assert _seconds(state["RunTime"]) <= fail_fast + 20, (state["RunTime"], log[-3000:])
    assert time.monotonic() - start < 120


def test_submitit_sweep_runs_each_point_as_a_two_task_slurm_job_and_usr2_requeues_it(cluster_env, tmp_path):
    # Point 0 gets hydra-submitit-launcher's time-limit signal (USR2) after its first step: the
    # trainers' handler, not submitit's, acts on it; they save together after step 5 (the stop
    # check) and exit 75, slurm/env.sh's wrapper of submitit's step requeues the array element,
    # and the sweep command returns once the requeued point has finished.
    iters = 10
    cmd = train_command(["-m", "hydra/launcher=slurm_local", "experiment=pretrain_tiny", "optim.lr=1e-3,3e-3",
                         f"train.train_iters={iters}", *FAST, f"run_dir={tmp_path}"])
    env = {**cluster_env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    sweep = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    submitit_dir = tmp_path / "sweep" / ".submitit"
    try:
        deadline = time.monotonic() + 300
        while not (tmp_path / "sweep" / "0" / "metrics.jsonl").is_file() and sweep.poll() is None:
            assert time.monotonic() < deadline, "point 0 did not start training in 300 s"
            time.sleep(0.2)
        signalled = next(p.name for p in submitit_dir.iterdir() if re.fullmatch(r"\d+_0", p.name))
        wait_for_file_lines(tmp_path / "sweep" / "0" / "metrics.jsonl", 1, signalled, cluster_env)
        subprocess.run(["scancel", "--signal=USR2", signalled], env=cluster_env, check=True)
        output, _ = sweep.communicate(timeout=900)
    finally:
        sweep.kill()
    assert sweep.returncode == 0, output[-5000:]
    curves = []
    for point, lr in enumerate((1e-3, 3e-3)):
        run_dir = tmp_path / "sweep" / str(point)
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and config["parallel"]["tp"] == 2  # a TP2 job: 2 SLURM tasks
        curves.append(losses(read_metrics(run_dir)))
        steps = [r["step"] for r in read_metrics(run_dir) if "loss" in r]
        assert steps == list(range(1, iters + 1)), f"point {point}: every step trained exactly once"
        saved = sorted(p.name for p in (run_dir / "checkpoints").glob("iter_*"))
        assert saved == [f"iter_{i:07d}" for i in ((5, iters) if point == 0 else (iters,))], saved
    assert curves[0] != curves[1]
    # One job-array element per point, each with a result from both of its SLURM tasks.
    elements = sorted(p for p in submitit_dir.iterdir() if re.fullmatch(r"\d+_\d+", p.name))
    assert [p.name.split("_")[1] for p in elements] == ["0", "1"]
    for element in elements:
        assert sorted(r.name for r in element.glob("*_result.pkl")) == [f"{element.name}_{t}_result.pkl" for t in (0, 1)]
        restarts = job_state(element.name, cluster_env)["Restarts"]
        assert restarts == ("1" if element.name == signalled else "0")
    batch_log = (submitit_dir / signalled / f"{signalled}_0_log.out").read_text()
    task_log = (submitit_dir / signalled / f"{signalled}_0_log.err").read_text()
    assert "received SIGUSR2: saving and stopping" in task_log and "requeueing job" in batch_log
    assert "Caught signal" not in task_log + batch_log  # submitit's handler never ran
    assert "loaded" in batch_log and "iter_0000005" in batch_log  # the requeued point resumed from the save
