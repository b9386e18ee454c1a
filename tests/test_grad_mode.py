"""No autograd graph in any forward-only pass: validation, DPO's reference and GRPO's old/reference log-probs.

A forward hook on the model records, at every forward, whether grad mode was on and whether
the output carries a graph. Validation and the log-prob passes must record neither (each
graph holds a step's activations until it is freed); a training step must record both, which
shows the hook sees what the passes do.
"""

from __future__ import annotations

from typing import List, Tuple

import pytest
import torch

from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.convert.verify_worker import join_process_group, spawn_ranks
from megatron_qwen.generation.engine import Rollouts
from megatron_qwen.model.build import build_model
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training.optim import build_optimizer, build_scheduler, wrap_model
from megatron_qwen.training.stages.grpo.rollout import micro_batches
from megatron_qwen.training.stages.grpo.stage import GRPOStage
from megatron_qwen.training.stages.lm import LanguageModelStage
from megatron_qwen.training.stages.logprobs import SequenceLogpsPass, sequence_logps_pass
from megatron_qwen.training.step import evaluate, train_step
from tests.helpers import free_port

SEQ, MICRO, GROUP = 8, 2, 2


def _config() -> Config:
    cfg = Config(model=ModelConfig(vocab_size=64))
    cfg.train.seq_length, cfg.train.micro_batch_size, cfg.train.global_batch_size = SEQ, MICRO, MICRO
    cfg.parallel.dp = 1
    cfg.stage.group_size, cfg.stage.beta = GROUP, 0.0
    cfg.optim.warmup_iters = 0
    return cfg


def _rows(*shape: int) -> dict:
    tokens = torch.randint(64, (*shape, SEQ), generator=torch.Generator().manual_seed(0))
    return {"tokens": tokens, "labels": tokens.roll(-1, -1), "loss_mask": torch.ones(*shape, SEQ)}


def _rollout_batches() -> list:
    """One packed micro-batch of MICRO prompts' groups, as GRPO's rollout makes them."""
    rollouts = Rollouts([[1, 2, 3]] * (MICRO * GROUP), [[4, 5]] * (MICRO * GROUP), [True] * (MICRO * GROUP))
    return micro_batches(rollouts, {"reward": torch.zeros(MICRO * GROUP)}, GROUP, range(MICRO), MICRO, None, SEQ)


def _record(model: List[torch.nn.Module]) -> List[Tuple[bool, bool]]:
    seen: List[Tuple[bool, bool]] = []
    for chunk in model:
        chunk.register_forward_hook(lambda module, args, out: seen.append((torch.is_grad_enabled(),
                                                                           out.requires_grad)))
    return seen


def _check(rank: int, port: int) -> None:
    join_process_group(rank, 1, port, threads=1)
    try:
        cfg = _config()
        init_model_parallel(cfg)
        model = wrap_model(cfg, build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed))
        seen = _record(model)
        lm = LanguageModelStage(cfg)
        evaluate(lm, model, lambda: [iter([_rows(MICRO)] * 2)], 2, 1, SEQ, MICRO)
        assert seen == [(False, False)] * 2, f"validation: {seen}"
        seen.clear()
        sequence_logps_pass(SequenceLogpsPass(cfg, 2), model, [[_rows(MICRO, 2)]], SEQ, MICRO)  # DPO reference
        assert seen == [(False, False)], f"DPO reference log-probs: {seen}"
        seen.clear()
        grpo = GRPOStage(cfg)
        grpo.model = model
        grpo._attach_logps(_rollout_batches(), model, "old_logps")  # also the reference's pass
        assert seen == [(False, False)], f"GRPO old log-probs: {seen}"
        seen.clear()
        optimizer = build_optimizer(cfg, model)
        train_step(lm, model, optimizer, build_scheduler(cfg, optimizer, 10), [iter([_rows(MICRO)])], 1, SEQ, MICRO)
        assert seen == [(True, True)], f"a training step must build its graph: {seen}"
        assert all(chunk.training for chunk in model)  # eval_mode restored the mode
    finally:
        destroy()


@pytest.mark.distributed
def test_forward_only_passes_record_no_autograd_graph():
    spawn_ranks(_check, free_port(), 1, "grad mode check")
