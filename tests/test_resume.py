"""Resume: interrupted runs continue exactly, also into another parallel layout."""

import shutil

import pytest

from tests.helpers import QUIET, TINY, assert_close, losses, metric, read_metrics, run_cli, run_train, train_command

STEPS = 10
COMMON = [f"train.train_iters={STEPS}"]
DISTOPT = "parallel.use_distributed_optimizer=true"
FP32 = {"loss": 1e-6, "grad_norm": 1e-6}  # as the layout tests (tests/test_layouts.py)
# Dropout makes every step consume random numbers: a resume that did not restore the RNG
# state (CPU generator and megatron's tracker) would draw other masks from step 6 on.
DROPOUT = ["model.hidden_dropout=0.1", "model.attention_dropout=0.1"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    return run_train(tmp_path_factory.mktemp("straight"), COMMON)


def _first_half(run_dir, nproc, overrides):
    """Trains 5 of 10 steps (exit_interval saves and exits) and returns the checkpoint root."""
    run_train(run_dir, COMMON + ["train.exit_interval=5", *overrides], nproc=nproc)
    assert (run_dir / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "5"
    return run_dir / "checkpoints"


def _bit_exact(resumed, straight):
    for key in ("loss", "grad_norm"):
        assert metric(resumed, key) == metric(straight, key), key


@pytest.mark.parametrize("overrides", [DROPOUT, ["precision=bf16"]], ids=["dropout_rng", "bf16"])
def test_resume_is_bit_exact_with_randomness_and_in_bf16(overrides, tmp_path):
    """Same layout: 5 + resume + 5 is bit-identical to 10 (fp32 with dropout, and bf16)."""
    straight = run_train(tmp_path / "straight", COMMON + overrides)
    _first_half(tmp_path / "resumed", 1, overrides)
    if overrides == DROPOUT:  # first, resuming with the other optimizer kind is refused and changes nothing
        proc = run_cli(train_command([*TINY, *QUIET, *COMMON, *overrides, DISTOPT, f"run_dir={tmp_path / 'resumed'}"]),
                       check=False)
        assert proc.returncode == 2 and "use_distributed_optimizer" in proc.stderr, proc.stderr[-2000:]
    _bit_exact(run_train(tmp_path / "resumed", COMMON + overrides), straight)


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
        resumed = run_train(run_dir, COMMON + layout, nproc=2)
        assert [r["step"] for r in resumed] == list(range(6, STEPS + 1)), "must continue at step 6"
        assert_close(resumed, [r for r in straight if r["step"] > 5], FP32, label=str(layout))


def test_keep_last_and_latest_marker(tmp_path):
    run_train(tmp_path, ["train.train_iters=6", "checkpoint.save_interval=2", "checkpoint.keep_last=2"])
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir() if p.is_dir()) == ["iter_0000004", "iter_0000006"]
    assert (root / "latest_checkpointed_iteration.txt").read_text().strip() == "6"
    assert (root / "iter_0000006" / "run_config.yaml").is_file()
    assert not list(root.glob("*.tmp"))


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


def test_bf16_weights_only_load_continues_from_the_loaded_weights(tmp_path):
    # Fine-tuning flow (checkpoint.load, new run): mixed-precision optimizers keep fp32 main
    # copies of the weights; unless refreshed after the load they overwrite the loaded
    # weights with the random initial ones at the first step.
    bf16, evals = ["precision=bf16"], ["train.eval_iters=1"]
    run_train(tmp_path / "pretrain", ["train.train_iters=4", "checkpoint.save_at_end=true", "train.eval_interval=4",
                                      *evals, *bf16])
    trained = read_metrics(tmp_path / "pretrain", "eval.jsonl")[-1]["val_loss"]
    run_train(tmp_path / "finetune", ["train.train_iters=3", "optim.lr=1e-9", "optim.min_lr=0", "optim.warmup_iters=0",
                                      "train.eval_interval=1", *evals, *bf16,
                                      f"checkpoint.load={tmp_path / 'pretrain' / 'checkpoints'}"])
    after = [r["val_loss"] for r in read_metrics(tmp_path / "finetune", "eval.jsonl")]
    assert len(after) == 3
    for val in after:  # lr 1e-9: the weights stay the loaded ones, step after step
        assert val == pytest.approx(trained, rel=1e-4), (after, trained)
