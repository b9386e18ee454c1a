"""DPO learns: after a short SFT on the synthetic sums, DPO separates right from wrong answers.

The task (megatron_qwen.data.arithmetic, fixed seeds): "What is a + b?" with a, b in 0..4; SFT
conversations answer correctly, preference pairs prefer the correct sum over a near miss. The
tiny model first learns the format and most sums with SFT (stage=sft), then DPO (stage=dpo,
reference = that SFT checkpoint, precomputed) must raise the implicit reward of every right
answer above the wrong one on held-out pairs. Before the first DPO update the policy is the
reference, so every reward is exactly 0 (trl counts ties as wrong: accuracy 0, chance 0.5).
"""

from __future__ import annotations

import pytest

from tests.dpo_support import SEQ, TINY_MODEL, dpo_overrides, make_task
from tests.helpers import QUIET, read_metrics, run_train

CONSTANT_LR = ["optim.decay_style=constant", "optim.weight_decay=0.0"]


@pytest.mark.slow
def test_validation_reward_accuracy_reaches_0_9(tmp_path):
    task = make_task(tmp_path, pairs=512, max_operand=4)
    sft = tmp_path / "sft"
    run_train(sft, ["stage=sft", *TINY_MODEL, f"data.tokenizer={task['tokenizer']}",
                    f"data.blend=[{{path: '{task['sft']}', weight: 1.0}}]", "data.extra.pack=false",
                    f"data.cache_dir={tmp_path / 'cache'}", f"train.seq_length={SEQ}", "train.train_iters=500",
                    "train.micro_batch_size=16", "train.global_batch_size=16", "train.eval_interval=0",
                    *CONSTANT_LR, "optim.lr=3e-3", "optim.min_lr=3e-3", "optim.warmup_iters=5",
                    "checkpoint.save_interval=null", "logging.log_interval=100", *QUIET], tiny=False)
    dpo = tmp_path / "dpo"
    records = run_train(dpo, [*dpo_overrides(task, tmp_path / "cache"), *QUIET,
                              f"checkpoint.load={sft / 'checkpoints'}",
                              "train.train_iters=120", "train.micro_batch_size=32", "train.global_batch_size=32",
                              "train.eval_interval=40", "train.eval_iters=2", *CONSTANT_LR, "optim.lr=1e-3",
                              "optim.min_lr=1e-3"], tiny=False)
    first = records[0]
    assert first["step"] == 1 and first["rewards/margin"] == 0.0 and first["rewards/accuracy"] == 0.0
    valid = {r["step"]: r for r in read_metrics(dpo, "eval.jsonl")}
    print({step: round(r["rewards/accuracy"], 3) for step, r in valid.items()})
    assert valid[120]["rewards/accuracy"] >= 0.9
    assert valid[120]["rewards/margin"] > valid[40]["rewards/margin"] > 0
    assert valid[120]["loss"] < valid[40]["loss"] < 0.69
