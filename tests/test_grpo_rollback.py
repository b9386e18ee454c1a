"""A rollback during GRPO with several updates per rollout samples afresh from the restored weights.

With ``stage.updates_per_rollout`` k > 1 a rollout covers the next k steps; a rollback to the
checkpoint before them must not train on what is left of that rollout (sampled by weights the
rollback discarded): the next trained step samples anew, and only its own window's prompts
(the rolled-back batch is skipped, so the window has one step left).
"""

from __future__ import annotations

from pathlib import Path
from typing import List

import pytest

from megatron_qwen.convert.verify_worker import join_process_group, spawn_ranks
from tests.grpo_support import make_grpo_task
from tests.helpers import QUIET, free_port

ROLLBACK_AT = 3  # the first of the second rollout's two steps


def _overrides(task: dict, run_dir: Path) -> List[str]:
    return ["stage=grpo", "model=qwen2_5_tiny", "model.vocab_size=256", f"data.tokenizer={task['tokenizer']}",
            f"data.blend=[{{path: '{task['prompts']}', weight: 1.0}}]", "data.valid_blend=null",
            "train.seq_length=40", "stage.max_new_tokens=4", "stage.group_size=2", "stage.beta=0",
            "stage.updates_per_rollout=2", "train.stop_check_interval=2", "train.train_iters=4",
            "train.micro_batch_size=2", "train.global_batch_size=2", "train.eval_interval=0",
            "checkpoint.save_interval=2", "checkpoint.save_at_end=false", *QUIET, f"run_dir={run_dir}"]


def _check(rank: int, job) -> None:
    port, task, run_dir = job
    join_process_group(rank, 1, port, threads=1)
    from megatron_qwen.config.store import compose_config
    from megatron_qwen.config.validate import validate
    from megatron_qwen.platform.parallel import destroy, init_model_parallel
    from megatron_qwen.training.loop import Trainer
    from megatron_qwen.training.resilience.guard import Verdict
    from megatron_qwen.training.stages import build_stage

    try:
        cfg = validate(compose_config(_overrides(task, run_dir)), 1)
        init_model_parallel(cfg)
        Path(run_dir).mkdir()
        trainer = Trainer(cfg, "", build_stage(cfg))
        sampled_before: List[int] = []  # the step about to run at each rollout
        rollout = trainer.stage._rollout
        trainer.stage._rollout = lambda *a: sampled_before.append(trainer.state.iteration + 1) or rollout(*a)
        after_step = trainer.guard.after_step
        spiked = []

        def spike_once(step, *args):
            if step == ROLLBACK_AT and not spiked:
                spiked.append(step)
                return Verdict(rollback="test spike")
            return after_step(step, *args)

        trainer.guard.after_step = spike_once
        trainer.train()
        assert spiked == [ROLLBACK_AT] and trainer.state.iteration == 4
        # The rollback skips step 3's batch; step 4 samples its own prompts anew (it trained on the
        # rollout the discarded weights had sampled before the pending rollout was cleared).
        assert sampled_before == [1, 3, 4], sampled_before
    finally:
        destroy()


@pytest.mark.distributed
def test_rollback_drops_the_rollout_of_the_discarded_steps(tmp_path):
    spawn_ranks(_check, (free_port(), make_grpo_task(tmp_path), tmp_path / "run"), 1, "GRPO rollback check")
