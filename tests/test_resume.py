"""Resume: interrupted runs continue exactly, also into another parallel layout."""

import shutil

import pytest

from tests.helpers import QUIET, TINY, assert_losses_close, losses, run_cli, run_train, train_command

STEPS = 10
COMMON = [f"train.train_iters={STEPS}"]
DISTOPT = "parallel.use_distributed_optimizer=true"


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return losses(run_train(tmp_path_factory.mktemp("straight"), COMMON))


def _first_half(run_dir, nproc, overrides):
    """Trains 5 of 10 steps (exit_interval saves and exits) and returns the checkpoint root."""
    run_train(run_dir, COMMON + ["train.exit_interval=5", *overrides], nproc=nproc)
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    return run_dir / "checkpoints"


def test_resume_is_exact(straight, tmp_path):
    _first_half(tmp_path, 1, [])
    resumed = losses(run_train(tmp_path, COMMON))
    assert_losses_close(resumed, straight, range(1, STEPS + 1))
    assert resumed == straight  # same layout: bit-identical


@pytest.mark.distributed
@pytest.mark.parametrize("save_layout,load_layouts", [
    (["parallel.tp=2"], [["parallel.pp=2"]]),
    (["parallel.tp=2", DISTOPT], [["parallel.pp=2", DISTOPT], [DISTOPT]]),
    (["parallel.pp=2", "parallel.vpp=2"], [["parallel.tp=2"]]),
], ids=["tp2_to_pp2", "tp2_distopt_to_pp2_and_dp2", "vpp2_to_tp2"])
def test_resharded_resume(straight, tmp_path, save_layout, load_layouts):
    ckpt = _first_half(tmp_path / "saved", 2, save_layout)
    for i, layout in enumerate(load_layouts):
        run_dir = tmp_path / f"resumed{i}"
        shutil.copytree(ckpt, run_dir / "checkpoints")
        resumed = losses(run_train(run_dir, COMMON + layout, nproc=2))
        assert sorted(resumed) == list(range(6, STEPS + 1)), "must continue at step 6"
        assert_losses_close(resumed, straight, range(6, STEPS + 1))


def test_keep_last_and_latest_marker(tmp_path):
    run_train(tmp_path, ["train.train_iters=6", "checkpoint.save_interval=2", "checkpoint.keep_last=2"])
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000004", "iter_0000006"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (root / "iter_0000006" / "run_config.yaml").is_file()
    assert not list(root.glob("*.tmp"))


def test_optimizer_format_mismatch_is_a_clear_error(tmp_path):
    _first_half(tmp_path, 1, [])
    proc = run_cli(train_command([*TINY, *QUIET, *COMMON, DISTOPT, f"run_dir={tmp_path}"]), check=False)
    assert proc.returncode != 0
    assert "use_distributed_optimizer" in proc.stderr + proc.stdout


@pytest.mark.distributed
def test_moe_expert_parallel_change_is_a_clear_error(tmp_path):
    # EP2 gives expert parameters their own optimizer; EP1 has one. Weights-only loading is the way.
    moe = ["model=qwen2_moe_tiny", "train.train_iters=4"]
    first = losses(run_train(tmp_path, [*moe, "parallel.ep=2", "train.exit_interval=2"], nproc=2))
    proc = run_cli(train_command([*TINY, *QUIET, *moe, f"run_dir={tmp_path}"]), check=False)
    assert proc.returncode == 2
    assert "expert-parallel split" in proc.stderr and "checkpoint.load" in proc.stderr
    fresh = tmp_path.parent / f"{tmp_path.name}_weights"
    records = run_train(fresh, [*moe, f"checkpoint.load={tmp_path / 'checkpoints'}"])
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # counters and optimizer start fresh
    assert losses(records)[1] < first[1] - 1e-3  # ... from the trained weights (same first batch)
