"""Hydra multirun without SLURM: every point in one process, each in a clean process group."""

from __future__ import annotations

import pytest
import yaml

from tests.helpers import QUIET, TINY, losses, read_metrics, run_cli, train_command


@pytest.mark.slow
def test_local_multirun_gives_each_point_its_own_run_dir_and_a_clean_process_group(tmp_path):
    # Three points in one process; the third repeats the first, so any state left behind by
    # the earlier points (process group, megatron parallel state, RNG trackers) would show
    # up as a different loss curve.
    iters = 8
    overrides = ["-m", "optim.lr=3e-3,1e-3,3e-3", *TINY, *QUIET, f"train.train_iters={iters}", f"run_dir={tmp_path}"]
    run_cli(train_command(overrides), timeout=900)
    curves = []
    for point, lr in enumerate((3e-3, 1e-3, 3e-3)):
        run_dir = tmp_path / "sweep" / str(point)
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["optim"]["lr"] == lr
        curves.append(losses(read_metrics(run_dir)))
        assert sorted(curves[-1]) == list(range(1, iters + 1))
    assert curves[0] == curves[2]
    assert curves[0] != curves[1]
