"""A stage without a learning signal says so once: GRPO whose rewards are all equal, DPO below chance."""

from __future__ import annotations

import logging

import pytest
import torch

from megatron_qwen.config.schema import Config
from megatron_qwen.training.stages.dpo.stage import DPOStage
from megatron_qwen.training.stages.no_signal import NoSignalWatch
from tests.grpo_support import make_grpo_task
from tests.helpers import QUIET, read_metrics, run_cli, train_command


def test_the_watch_warns_once_after_the_limit_and_resets_on_a_signal(caplog):
    watch = NoSignalWatch(limit=3)
    with caplog.at_level(logging.WARNING):
        for _ in range(2):
            watch.step()
        assert not watch.observe(False, "none for {steps} steps")  # 2 < 3
        watch.step()
        assert watch.observe(True, "none for {steps} steps") is False  # a signal: the count restarts
        for _ in range(3):
            watch.step()
            warned = watch.observe(False, "none for {steps} steps")
        assert warned and [r.getMessage() for r in caplog.records] == ["none for 3 steps"]
        watch.step()
        assert not watch.observe(False, "none for {steps} steps")  # once


def test_dpo_warns_when_validation_accuracy_stays_at_chance(caplog):
    cfg = Config()
    cfg.stage.name, cfg.stage.no_signal_warn_steps = "dpo", 2
    stage = DPOStage(cfg)
    batch = {"loss_mask": torch.ones(1, 2, 4)}
    record = {"loss": 0.69, "rewards/chosen": 0.0, "rewards/rejected": 0.0, "rewards/accuracy": 0.5,
              "rewards/margin": 0.0, "logps/chosen": -1.0, "logps/rejected": -1.0}
    with caplog.at_level(logging.WARNING):
        stage.eval_record(record)  # step 0: the policy is the reference, every pair ties
        for _ in range(2):
            stage.before_step([iter([batch])], 1, training=True)
        stage.eval_record(record)
    [warning] = [r.getMessage() for r in caplog.records]
    assert "validation rewards/accuracy 0.50 has stayed at or below chance (0.5) for 2 steps" in warning


@pytest.mark.slow
def test_grpo_without_reward_signal_warns_and_logs_frac_reward_zero_std(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    task = make_grpo_task(tmp_path / "task")  # a random model never answers a sum: every reward is 0
    run_dir = tmp_path / "run"
    proc = run_cli(train_command(["stage=grpo", "model=qwen2_5_tiny", "model.vocab_size=256",
                                  f"data.tokenizer={task['tokenizer']}", "train.seq_length=40",
                                  f"data.blend=[{{path: '{task['prompts']}', weight: 1.0}}]", "data.valid_blend=null",
                                  "stage.group_size=2", "stage.max_new_tokens=4", "stage.beta=0",
                                  "stage.no_signal_warn_steps=2", "train.train_iters=2", "train.micro_batch_size=2",
                                  "train.global_batch_size=2", "train.eval_interval=0", "logging.log_interval=1",
                                  "checkpoint.save_interval=null", "checkpoint.save_at_end=false", *QUIET,
                                  "logging.tensorboard=true", f"run_dir={run_dir}"]))
    out = proc.stdout + proc.stderr
    assert out.count("no learning signal for 2 steps: in every group the 2 completions got the same reward "
                     "(frac_reward_zero_std 1.00, mean reward 0.000)") == 1, out[-3000:]
    assert [r["frac_reward_zero_std"] for r in read_metrics(run_dir)] == [1.0, 1.0]
    assert "frac_reward_zero_std 1.0000" in proc.stdout  # the console line
    events = EventAccumulator(str(run_dir / "tensorboard")).Reload()
    assert [e.value for e in events.Scalars("train/frac_reward_zero_std")] == [1.0, 1.0]
