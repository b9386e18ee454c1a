"""Damaged run directories, exact metrics after resume, NaN and loss-spike handling, async save."""

import json
import shutil

import pytest

from tests.helpers import (QUIET, TINY, checkpoint_weights, metric, read_metrics, run_cli, run_train,
                           train_command)

CONSTANT_LR = ["optim.decay_style=constant", "optim.min_lr=1e-3"]  # the LR of a step ignores train_iters
KEYS = ("loss", "grad_norm", "lr", "skipped_iters", "consumed_samples")


def _same(got, ref):
    """The same steps with bit-identical values of every key of KEYS."""
    assert [r["step"] for r in got] == [r["step"] for r in ref]
    for key in KEYS:
        assert metric(got, key) == metric(ref, key), key


@pytest.fixture(scope="module")
def six_steps(tmp_path_factory):
    """6 steps with checkpoints at 4 and 6, TensorBoard and an offline wandb run."""
    run_dir = tmp_path_factory.mktemp("six")
    run_train(run_dir, ["train.train_iters=6", "checkpoint.save_interval=2", *CONSTANT_LR,
                        "logging.tensorboard=true", "logging.wandb_mode=offline"])
    return run_dir


def test_missing_latest_checkpoint_resumes_from_the_previous_one_with_exact_metrics(six_steps, tmp_path):
    # The reported failure: latest_checkpointed_iteration.txt says 6, iter_0000006 is gone.
    first = read_metrics(six_steps)
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps, run_dir)
    shutil.rmtree(run_dir / "checkpoints" / "iter_0000006")
    (run_dir / "checkpoints" / "iter_0000004" / "manifest.json").unlink()  # as written before manifests
    proc = run_cli(train_command([*TINY, *QUIET, "train.train_iters=8", "checkpoint.save_interval=2", *CONSTANT_LR,
                                  "logging.tensorboard=true", "logging.wandb_mode=offline", f"run_dir={run_dir}"]))
    log = proc.stdout + proc.stderr
    assert "iter_0000004 (the newest complete checkpoint there)" in log
    assert "names iteration 6, whose directory is missing" in log
    assert "iter_0000004 has no manifest.json (written before checksums were recorded)" in log
    records = read_metrics(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))  # steps 5 and 6 once, not twice
    _same(records[:6], first)  # steps 5-6 again from the same checkpoint: bit-identical
    checkpoints = sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.is_dir())
    assert checkpoints == ["iter_0000006", "iter_0000008"]  # iter_4 pruned only once two newer exist
    _tensorboard_has_each_step_once(run_dir, records)
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(run_id) for name in offline)  # one wandb run, resumed


def _tensorboard_has_each_step_once(run_dir, records):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("train/loss")
    assert [e.step for e in scalars] == [r["step"] for r in records]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in records], rel=1e-6)


def test_damaged_checkpoints_stop_before_training_with_one_line_errors(six_steps, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(six_steps / "checkpoints", run_dir / "checkpoints")
    for shard in (run_dir / "checkpoints").glob("iter_*/__0_1.distcp"):
        shard.write_bytes(shard.read_bytes()[:1000])  # truncated copies
    before = sorted((str(p), p.stat().st_size) for p in (run_dir / "checkpoints").rglob("*"))
    proc = run_cli(train_command([*TINY, *QUIET, "train.train_iters=8", f"run_dir={run_dir}"]), check=False)
    assert proc.returncode == 2
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"error: {run_dir / 'checkpoints'} has checkpoints but none is complete")
    assert "__0_1.distcp has 1000 bytes" in error and "checkpoint.load=" in error
    assert not (run_dir / "metrics.jsonl").exists()
    assert sorted((str(p), p.stat().st_size) for p in (run_dir / "checkpoints").rglob("*")) == before  # untouched

    fresh = tmp_path / "fresh"
    load = f"checkpoint.load={run_dir / 'checkpoints' / 'iter_0000006'}"
    proc = run_cli(train_command([*TINY, *QUIET, load, f"run_dir={fresh}"]), check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert "is not a complete checkpoint" in error and "__0_1.distcp has 1000 bytes" in error
    assert not (fresh / "metrics.jsonl").exists()  # failed before any training step


# A model that has learned the mock data (loss ~1 by step 20) makes an injected batch spike.
SPIKY = ["train.train_iters=24", "optim.lr=1e-2", "optim.min_lr=1e-2", "optim.decay_style=constant"]
BAD_STEP, GBS = 20, 8


@pytest.fixture(scope="module")
def batch_skipped(tmp_path_factory):
    """Reference: step 20's batch listed in skipped_samples.jsonl up front, so it is never
    trained on: no forward pass, no update, no LR step (the data path, not the optimizer's)."""
    run_dir = tmp_path_factory.mktemp("skipped")
    record = {"step": BAD_STEP, "first_sample": (BAD_STEP - 1) * GBS, "num_samples": GBS, "reason": "reference"}
    (run_dir / "skipped_samples.jsonl").write_text(json.dumps(record) + "\n")
    return run_train(run_dir, SPIKY)


def test_nan_gradient_skips_the_update_and_training_continues_as_without_that_batch(batch_skipped, tmp_path):
    records = run_train(tmp_path, [*SPIKY, f"debug.nan_grad_at_steps=[{BAD_STEP}]"])
    step = records[BAD_STEP - 1]
    assert step["skipped_iters"] == 1 and step["loss"] is None and step["grad_norm"] is None
    _same(records, batch_skipped)  # afterwards bit-identical to never training on that batch


def test_loss_spike_rolls_back_and_skips_the_batch(batch_skipped, tmp_path):
    proc = run_cli(train_command([*TINY, *QUIET, *SPIKY, f"debug.spike_batch_at_steps=[{BAD_STEP}]",
                                  "train.loss_spike.action=rollback", "train.loss_spike.zscore=6",
                                  "train.loss_spike.window=5", "train.loss_spike.min_history=5",
                                  "checkpoint.save_interval=8", f"run_dir={tmp_path}"]))
    assert f"step {BAD_STEP}: rolled back to iter_0000016" in proc.stdout + proc.stderr
    skipped = read_metrics(tmp_path, "skipped_samples.jsonl")
    assert [(r["step"], r["first_sample"], r["num_samples"]) for r in skipped] == [(BAD_STEP, 152, GBS)]
    assert "loss spike" in skipped[0]["reason"]
    _same(read_metrics(tmp_path), batch_skipped)  # replayed 17-19 exactly, skipped 20, one record per step


@pytest.mark.distributed
def test_consecutive_nans_stop_with_a_checkpoint_of_the_last_good_weights(tmp_path):
    # NaN on rank 0 only: rank 1 must learn of it through the gradient reduction and skip too.
    overrides = [*TINY, *QUIET, "train.train_iters=8", "checkpoint.save_interval=2", "checkpoint.keep_last=3",
                 "parallel.use_distributed_optimizer=true", "debug.nan_grad_at_steps=[3,4,5]",
                 "train.max_skipped_consecutive=3", f"run_dir={tmp_path}"]
    proc = run_cli(train_command(overrides, nproc=2), check=False)
    assert proc.returncode != 0
    assert "error: steps 3-5 all had a non-finite gradient norm (train.max_skipped_consecutive=3)" in proc.stderr
    assert [r["skipped_iters"] for r in read_metrics(tmp_path)] == [0, 0, 1, 1, 1]
    root = tmp_path / "checkpoints"
    assert (root / "iter_0000005" / "manifest.json").is_file()
    last_good, saved = checkpoint_weights(root / "iter_0000002"), checkpoint_weights(root / "iter_0000005")
    assert saved.keys() == last_good.keys() and all(saved[k].equal(last_good[k]) for k in saved)


def test_async_save_resume_is_exact(tmp_path):
    asynchronous = ["checkpoint.async_save=true", "checkpoint.save_interval=5", "train.train_iters=10"]
    straight = run_train(tmp_path / "straight", asynchronous)  # saves at 5 while steps 6-10 run
    assert sorted(p.name for p in (tmp_path / "straight" / "checkpoints").glob("iter_*")) == [
        "iter_0000005", "iter_0000010"]  # the end of training waited for the last one
    run_train(tmp_path / "resumed", [*asynchronous, "train.exit_interval=5"])
    assert (tmp_path / "resumed" / "checkpoints" / "iter_0000005" / "manifest.json").is_file()
    _same(run_train(tmp_path / "resumed", asynchronous), straight)


def test_failure_handling_settings_are_validated():
    from megatron_qwen.config import ConfigError, validate
    from megatron_qwen.config.store import compose_config

    def errors(*overrides):
        with pytest.raises(ConfigError) as err:
            validate(compose_config(list(overrides)), 1)
        return str(err.value)

    assert "train.loss_spike.action=warn needs train.loss_spike.factor" in errors("train.loss_spike.action=warn")
    assert "needs checkpoints to roll back to: set checkpoint.save_interval" in errors(
        "train.loss_spike.action=rollback", "train.loss_spike.zscore=6", "checkpoint.save_interval=null")
    assert "train.max_skipped_consecutive=0 must be >= 1" in errors("train.max_skipped_consecutive=0")
    assert "debug.nan_grad_at_steps=[0]: steps count from 1" in errors("debug.nan_grad_at_steps=[0]")
