"""kill -9 at random moments (also mid-save, sync and async), resume, end where an
uninterrupted run ends; and a killed trainer leaves no checkpoint writer behind."""

import os
import random
import signal
import subprocess
import time

import psutil
import pytest

from tests.helpers import QUIET, REPO, TINY, metric, run_train, train_command

STEPS = 20
# Dropout: every step draws random numbers, so the RNG state must survive each crash too.
CRASHY = [f"train.train_iters={STEPS}", "checkpoint.save_interval=2", "checkpoint.keep_last=2",
          "parallel.use_distributed_optimizer=true", "model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


def _launch(run_dir, overrides, nproc):
    """The trainer (under torchrun when nproc > 1), logging to ``<run_dir>.log``."""
    cmd = train_command([*TINY, *QUIET, *overrides, f"run_dir={run_dir}"], nproc)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    log = open(run_dir.parent / f"{run_dir.name}.log", "a")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=log, start_new_session=True)


def _last_step(run_dir) -> int:
    path = run_dir / "metrics.jsonl"
    steps = [line for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return len(steps)


def _kill_run(proc) -> None:
    """``kill -9`` of the launcher's process group: torchrun alone, since it starts each rank
    in a session of its own; the ranks and their checkpoint writers must follow it."""
    family = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(family, timeout=30)
    for member in alive:
        member.kill()
    assert not alive, f"left running after kill -9 of the run: {[p.pid for p in alive]}"


def _saving(run_dir) -> bool:
    return any((run_dir / "checkpoints").glob("iter_*.tmp"))


def _wait_until(proc, ready, timeout=300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and not ready():
        assert time.time() < deadline, "the trainer made no progress"
        time.sleep(0.01)


@pytest.mark.slow
@pytest.mark.distributed
def test_kill_9_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    straight = run_train(tmp_path / "straight", CRASHY, nproc=2)
    run_dir = tmp_path / "crashed"
    run_dir.mkdir()
    moments = ["sync save", "async save", "step", "step", "step"]
    for seed, moment in enumerate(moments):
        rng = random.Random(seed)
        use_async = "async" in moment or rng.random() < 0.5
        start, target = _last_step(run_dir), _last_step(run_dir) + rng.randint(1, 4)
        proc = _launch(run_dir, [*CRASHY, f"checkpoint.async_save={str(use_async).lower()}"], nproc=2)
        if "save" in moment:
            _wait_until(proc, lambda: _last_step(run_dir) > start and _saving(run_dir))
        else:
            _wait_until(proc, lambda: _last_step(run_dir) >= target)
            time.sleep(rng.uniform(0, 0.3))
        assert proc.poll() is None, f"{moment}: the run ended before it was killed"
        _kill_run(proc)
    final = run_train(run_dir, CRASHY, nproc=2)
    assert [r["step"] for r in final] == list(range(1, STEPS + 1))  # one record per step
    for key in ("loss", "grad_norm", "lr"):
        assert metric(final, key) == metric(straight, key), key  # bit for bit (fp32)


@pytest.mark.slow
def test_killed_trainer_leaves_no_checkpoint_writer_behind(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    proc = _launch(run_dir, ["train.train_iters=500", "checkpoint.save_interval=1", "checkpoint.async_save=true"],
                   nproc=1)
    try:
        _wait_until(proc, lambda: (run_dir / "checkpoints" / "iter_0000001").is_dir() and _saving(run_dir))
        children = psutil.Process(proc.pid).children(recursive=True)  # writer, its workers, results queue
        assert children, "a saving trainer has checkpoint-writer processes"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 20
        while time.time() < deadline and _alive(children):
            time.sleep(0.2)
        assert not _alive(children), [p.pid for p in _alive(children)]
    finally:
        for child in _alive(children if "children" in locals() else []):
            child.kill()
        if proc.poll() is None:
            proc.kill()


def _alive(processes):
    alive = []
    for p in processes:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                alive.append(p)
        except psutil.NoSuchProcess:
            pass
    return alive
