"""Stop signals: recorded from start-up on, acted on once training can save."""

import signal
import sys
import textwrap

from megatron_qwen.training.resilience.signals import RESUMABLE_EXIT_CODE
from tests.helpers import QUIET, TINY, run_cli

# A signal that arrives while the model is being built (minutes at 72B): the driver sends
# SIGUSR1 to itself at the start of Trainer construction, then runs the real CLI.
DRIVER = textwrap.dedent("""
    import os, signal, sys
    from megatron_qwen.training import loop
    from megatron_qwen import train

    build = loop.Trainer.__init__
    def signalled_build(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGUSR1)
        build(self, *args, **kwargs)
    loop.Trainer.__init__ = signalled_build
    sys.argv = ["train", *sys.argv[1:]]
    train.main()
""")


def test_signal_during_model_build_requeues_instead_of_killing(tmp_path):
    proc = run_cli([sys.executable, "-c", DRIVER, *TINY, *QUIET, "train.train_iters=6", f"run_dir={tmp_path}"],
                   check=False)
    assert proc.returncode == RESUMABLE_EXIT_CODE, (proc.returncode, proc.stderr[-2000:])  # not -SIGUSR1
    assert "stop signal received before the first step" in proc.stdout + proc.stderr
    assert not (tmp_path / "metrics.jsonl").exists() or not (tmp_path / "metrics.jsonl").read_text()
    assert proc.returncode != -signal.SIGUSR1


# SIGTERM during step 2 of a run that checks for stop signals every 5 steps.
MID_STEP = textwrap.dedent("""
    import os, signal, sys
    from megatron_qwen.training import loop
    from megatron_qwen import train

    step = loop.train_step
    calls = []
    def signalled_step(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(*args, **kwargs)
    loop.train_step = signalled_step
    sys.argv = ["train", *sys.argv[1:]]
    train.main()
""")


def test_a_signal_mid_run_is_acknowledged_with_the_step_it_stops_after(tmp_path):
    proc = run_cli([sys.executable, "-c", MID_STEP, *TINY, *QUIET, "train.train_iters=10",
                    "train.stop_check_interval=5", f"run_dir={tmp_path}"], check=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == RESUMABLE_EXIT_CODE, (proc.returncode, proc.stderr[-2000:])
    assert "received SIGTERM: saving and stopping at the next stop check" in out
    assert "stop signal received during step 2: the run saves and stops after step 5" in out
    assert (tmp_path / "checkpoints" / "iter_0000005").is_dir()


def test_under_submitit_the_trainers_handler_replaces_submitits_on_usr2_and_sigterm(monkeypatch, tmp_path):
    # submitit's task process installs its handlers (requeue from rank 0 alone, mid-step, no save)
    # before it calls the task; the trainer installs its own afterwards and they replace them.
    import os

    import submitit
    from submitit.core.utils import DelayedSubmission, JobPaths

    from megatron_qwen.training.resilience import signals

    monkeypatch.setattr(signals, "_received", [])
    saved = {s: signal.getsignal(s) for s in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    try:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")  # what submitit's batch script exports
        for key, value in {"SLURM_JOB_ID": "7", "SLURM_PROCID": "0", "SLURM_NTASKS": "2"}.items():
            monkeypatch.setenv(key, value)
        job_env = submitit.JobEnvironment()
        assert job_env.cluster == "slurm"
        job_env._handle_signals(JobPaths(tmp_path, job_id="7"), DelayedSubmission(print))
        assert signal.getsignal(signal.SIGUSR2).__self__.__class__.__name__ == "SignalHandler"
        assert signals.submitit_signal() == "SIGUSR2"
        signals.install("SIGUSR1")
        for sig in (signal.SIGUSR2, signal.SIGTERM, signal.SIGUSR1):
            assert signal.getsignal(sig) is signals._handler
        os.kill(os.getpid(), signal.SIGUSR2)  # submitit's would requeue through scontrol and sys.exit
        assert signals.received_here() and signals._received == [signal.SIGUSR2]
        monkeypatch.delenv("SUBMITIT_EXECUTOR")
        assert signals.submitit_signal() is None  # sbatch templates: their --signal (USR1) and SIGTERM only
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
