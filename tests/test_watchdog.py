"""Hang watchdog: a blocked 2-rank run leaves both ranks' stacks and exits non-zero in time;
a run that finishes leaves no trace of it."""

from __future__ import annotations

import faulthandler
import json
import time

import pytest

from megatron_qwen.training.resilience.watchdog import HANG_DIR, HangWatchdog
from tests.helpers import QUIET, TINY, run_cli, train_command

TIMEOUT_S = 4


@pytest.mark.distributed
def test_hung_collective_dumps_every_rank_and_exits_within_the_timeout(tmp_path):
    run_dir = tmp_path / "run"
    overrides = [*TINY, *QUIET, "train.train_iters=6", f"train.hang_timeout_s={TIMEOUT_S}",
                 "train.hang_startup_timeout_s=300", f"run_dir={run_dir}"]
    start = time.monotonic()
    proc = run_cli(train_command(overrides, nproc=2, module="tests.hang_driver"), check=False, timeout=300)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0, proc.stderr[-3000:]
    dumps = {rank: (run_dir / HANG_DIR / f"rank_{rank}.txt").read_text() for rank in (0, 1)}
    for rank, text in dumps.items():
        assert text.startswith(f"rank {rank}: hang watchdog armed at "), text[:500]
        assert f"Timeout (0:00:0{TIMEOUT_S})!" in text and "most recent call first" in text, text[-2000:]
    assert "distributed_c10d.py" in dumps[0] and " in recv" in dumps[0]  # the injected receive
    # rank 1 waits inside the real step, in a collective (DDP's gradient all-reduce), not in the receive
    assert "training/step.py" in dumps[1] and "distributed_c10d.py" in dumps[1] and " in recv" not in dumps[1]
    # The first step completed and was logged; the second never did.
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1], steps
    assert elapsed < 120, elapsed


def test_a_run_that_ends_leaves_no_dump_and_keeps_an_earlier_one(tmp_path):
    earlier = tmp_path / HANG_DIR / "rank_1.txt"
    earlier.parent.mkdir()
    earlier.write_text("stacks of an earlier hang\n")
    for rank in (0, 1):
        watchdog = HangWatchdog(tmp_path, rank, timeout_s=60, startup_timeout_s=60)
        watchdog.beat()
        watchdog.stop()
    assert earlier.read_text() == "stacks of an earlier hang\n"
    assert [p.name for p in (tmp_path / HANG_DIR).iterdir()] == ["rank_1.txt"]
    earlier.unlink()
    HangWatchdog(tmp_path, 0, timeout_s=60, startup_timeout_s=60).stop()
    assert not (tmp_path / HANG_DIR).exists()
    off = HangWatchdog(tmp_path, 0, timeout_s=None, startup_timeout_s=None)
    off.beat()
    off.stop()
    assert not (tmp_path / HANG_DIR).exists()
    faulthandler.cancel_dump_traceback_later()
