"""GRPO advantages and loss against trl's GRPOTrainer (trl 1.16, a test-only dependency).

The loss, its gradient and its metrics come from trl's own ``GRPOTrainer._compute_loss``
(trl/trainer/grpo_trainer.py), called on a bare trainer object whose model forward returns
the given log-probs. trl computes advantages inline in ``_generate_and_score_completions``
(the ``multi_objective_aggregation == "sum_then_normalize"`` branch with
``scale_rewards="group"``); :func:`_trl_advantages` repeats those lines with trl's ``nanstd``.
The per-token log-probs and entropy our training passes feed it are checked against trl's own
``_get_per_token_logps_and_entropies`` on the Hugging Face model of a converted checkpoint.
"""

from __future__ import annotations

import types
from collections import defaultdict

import pytest
import torch
from trl import GRPOTrainer
from trl.trainer.utils import nanstd

from megatron_qwen.training.stages.grpo.loss import aggregate, group_advantages, grpo_loss

G = 4
CLIP_LOW, CLIP_HIGH, BETA = 0.2, 0.28, 0.04


def _trl_advantages(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    # trl/trainer/grpo_trainer.py, GRPOTrainer._generate_and_score_completions (sum_then_normalize, group scale).
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    std_rewards = nanstd(rewards.view(-1, group_size), dim=1).repeat_interleave(group_size, dim=0)
    return torch.nan_to_num((rewards - mean_grouped_rewards) / (std_rewards + 1e-4), nan=0.0)


def _trl_loss(loss_type: str, logps, old, ref, advantages, mask, entropies):
    """trl's loss and metrics for these inputs (one process, one accumulation step)."""
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    identity = types.SimpleNamespace(num_processes=1, reduce=lambda t, reduction: t, gather=lambda t: t,
                                     gather_for_metrics=lambda t: t)
    trainer.__dict__.update(
        beta=BETA, epsilon_low=CLIP_LOW, epsilon_high=CLIP_HIGH, loss_type=loss_type,
        importance_sampling_level="token", top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        aux_loss_enabled=False, use_vllm=False, vllm_importance_sampling_correction=False,
        _entropy_bonus_enabled=False, current_gradient_accumulation_steps=1, accelerator=identity,
        model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *args, **kwargs: (logps, entropies, None))
    n, t = mask.shape
    inputs = {"prompt_ids": torch.zeros(n, 2, dtype=torch.long), "prompt_mask": torch.ones(n, 2),
              "completion_ids": torch.zeros(n, t, dtype=torch.long), "completion_mask": mask,
              "advantages": advantages, "old_per_token_logps": old, "ref_per_token_logps": ref,
              "num_items_in_batch": mask.sum()}
    loss = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.fixture(scope="module")
def batch():
    gen = torch.Generator().manual_seed(0)
    n, t = 3 * G, 7
    rewards = torch.tensor([1.0, 0.0, 0.5, 1.0, 0.0, 0.0, 0.0, 0.0, 0.2, 0.9, 0.4, 0.4])  # group 2: no spread
    lengths = torch.tensor([7, 3, 5, 1, 7, 6, 2, 4, 7, 5, 3, 6])
    mask = (torch.arange(t)[None, :] < lengths[:, None]).float()  # right-padded responses
    logps = -torch.rand(n, t, generator=gen) * 3
    old = logps + 0.4 * torch.randn(n, t, generator=gen)  # ratios well beyond both clip bounds, and for sure:
    old[0, 0], old[1, 0] = logps[0, 0] - 0.5, logps[1, 0] + 0.5  # ratio 1.65 at A > 0, 0.61 at A < 0
    ref = logps + 0.3 * torch.randn(n, t, generator=gen)
    entropies = torch.rand(n, t, generator=gen) * 4
    return rewards, mask, logps, old, ref, entropies


def test_advantages_equal_trl(batch):
    rewards = batch[0]
    ours = group_advantages(rewards, G)
    assert torch.allclose(ours, _trl_advantages(rewards, G), atol=1e-6, rtol=0)
    assert torch.equal(ours[4:8], torch.zeros(4))  # equal rewards: no signal
    # Other conventions: population std (Megatron-LM), centring only (Dr. GRPO).
    grouped = rewards.view(-1, G)
    population = (grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, correction=0, keepdim=True) + 1e-4)
    assert torch.allclose(group_advantages(rewards, G, std="population"), population.view(-1), atol=1e-6)
    assert torch.allclose(group_advantages(rewards, G, std="none"), (grouped - grouped.mean(1, keepdim=True)).view(-1))


@pytest.mark.parametrize("aggregation, trl_type", [("token", "dapo"), ("token", "bnpo"), ("sequence", "grpo")])
def test_loss_gradient_and_metrics_equal_trl(batch, aggregation, trl_type):
    rewards, mask, logps, old, ref, entropies = batch
    advantages = group_advantages(rewards, G)
    ours_in, trl_in = logps.clone().requires_grad_(), logps.clone().requires_grad_()
    loss_sum, count, metrics = grpo_loss(ours_in, old, ref, advantages, mask, clip_low=CLIP_LOW, clip_high=CLIP_HIGH,
                                         beta=BETA, aggregation=aggregation, entropy=entropies)
    trl_loss, trl_metrics = _trl_loss(trl_type, trl_in, old, ref, advantages, mask, entropies)
    total_num_tokens = torch.zeros([], dtype=torch.int)  # how megatron's schedules accumulate the count
    total_num_tokens += count
    assert total_num_tokens.item() == (mask.sum() if aggregation == "token" else len(mask))
    (loss_sum / count).backward()
    trl_loss.backward()
    assert abs((loss_sum / count).item() - trl_loss.item()) <= 1e-6
    assert torch.allclose(ours_in.grad, trl_in.grad, atol=1e-6, rtol=0)
    mean = {name: (value[0] / value[1]).item() for name, value in metrics.items()}
    assert mean["clip_low"] > 0 and mean["clip_high"] > 0  # both bounds active in this data
    for ours, theirs in [("kl", "kl"), ("entropy", "entropy"), ("clip_low", "clip_ratio/low_mean"),
                         ("clip_high", "clip_ratio/high_mean"), ("clip_fraction", "clip_ratio/region_mean")]:
        assert abs(mean[ours] - trl_metrics[theirs]) <= 1e-6, ours
    assert mean["response_length"] == pytest.approx(mask.sum().item() / len(mask))


def test_first_step_ratio_is_one_and_kl_vanishes_at_the_reference(batch):
    _, mask, logps, _, _, _ = batch
    advantages = torch.linspace(-1, 1, len(mask))
    _, _, metrics = grpo_loss(logps, logps, logps, advantages, mask, beta=0.5)
    assert metrics["ratio"][0] / metrics["ratio"][1] == pytest.approx(1.0)
    assert metrics["kl"][0] == 0 and metrics["clip_fraction"][0] == 0


def test_aggregations_and_bad_options():
    per_token = torch.tensor([[1.0, 3.0, 100.0], [2.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert [x.item() for x in aggregate(per_token, mask, "token")] == [6.0, 3.0]  # (1 + 3 + 2) over 3 tokens
    assert [x.item() for x in aggregate(per_token, mask, "sequence")] == [4.0, 2.0]  # (2 + 2) over 2 sequences
    with pytest.raises(ValueError, match="aggregation='mean'"):
        aggregate(per_token, mask, "mean")
    with pytest.raises(ValueError, match="groups of 3"):
        group_advantages(torch.zeros(4), 3)
    with pytest.raises(ValueError, match="std='bessel'"):
        group_advantages(torch.zeros(4), 2, std="bessel")


def test_packed_completion_logps_equal_trls_own_per_token_code_on_the_hf_model(tmp_path):
    """Our per-token log-probs and entropy (packed rows, output layer at completion positions) on a
    converted checkpoint equal trl's ``_get_per_token_logps_and_entropies`` on the Hugging Face model
    (left-padded prompts, right-padded completions, trl's fused LM head): a shift or mask error shows."""
    import contextlib

    import transformers
    from trl.trainer.utils import add_fused_lm_head

    from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
    from megatron_qwen.convert.random_hf import make_hf_model
    from megatron_qwen.convert.run_files import read_model_config, resolve_checkpoint
    from megatron_qwen.convert.verify_worker import Layout, layout_config, load_model
    from megatron_qwen.generation.engine import Rollouts
    from megatron_qwen.training.stages.grpo.rollout import micro_batches
    from megatron_qwen.training.stages.grpo.stage import as_sequences, completion_logits, completion_logps
    from megatron_qwen.training.step import pack_micro_batch
    from tests.data_support import destroy_single_rank, init_single_rank

    hf_dir = make_hf_model(tmp_path / "hf", layers=2, tied=True)
    hf_to_mcore(hf_dir, tmp_path / "ckpt", progress=False)
    gen = torch.Generator().manual_seed(1)
    ids = lambda n: torch.randint(1, 256, (n,), generator=gen).tolist()  # noqa: E731 (0 is trl's padding)
    prompts, completions = [ids(5), ids(3)], [ids(4), ids(1), ids(6), ids(2)]  # 2 prompts x G = 2
    rollouts = Rollouts([p for p in prompts for _ in range(2)], completions, [True] * 4)
    fields = {"reward": torch.zeros(4)}
    [batch] = micro_batches(rollouts, fields, 2, range(2), 2, None, 16)

    ckpt = resolve_checkpoint(tmp_path / "ckpt")
    cfg = layout_config(read_model_config(ckpt), Layout(), 1)
    init_single_rank(cfg)
    try:
        [model] = load_model(ckpt, cfg)
        packed, params = pack_micro_batch(batch)
        with torch.no_grad():
            logps, entropy = completion_logps(completion_logits(model, packed, params), packed["labels"],
                                              packed["loss_mask"])
        mask = as_sequences(packed["loss_mask"], packed["cu_seqlens"]) > 0
        ours = [(row[m], ent[m]) for row, ent, m in zip(as_sequences(logps, packed["cu_seqlens"]),
                                                         as_sequences(entropy, packed["cu_seqlens"]), mask)]
    finally:
        destroy_single_rank()

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    add_fused_lm_head(hf, outputs=("log_probs", "entropy"))
    width_p, width_c = max(len(p) for p in rollouts.prompt_ids), max(len(c) for c in completions)
    input_ids = torch.zeros(4, width_p + width_c, dtype=torch.long)
    attention = torch.zeros_like(input_ids)
    for i, (p, c) in enumerate(zip(rollouts.prompt_ids, completions)):  # trl's layout
        input_ids[i, width_p - len(p):width_p + len(c)] = torch.tensor(p + c)
        attention[i, width_p - len(p):width_p + len(c)] = 1
    trainer = GRPOTrainer.__new__(GRPOTrainer)
    trainer.accelerator = types.SimpleNamespace(autocast=contextlib.nullcontext, is_main_process=True)
    with torch.no_grad():
        trl_logps, trl_entropy, _ = GRPOTrainer._get_per_token_logps_and_entropies(
            trainer, hf, input_ids, attention, width_c, compute_entropy=True)
    for i, c in enumerate(completions):
        torch.testing.assert_close(ours[i][0], trl_logps[i, :len(c)], atol=1e-5, rtol=0)
        torch.testing.assert_close(ours[i][1], trl_entropy[i, :len(c)], atol=1e-4, rtol=0)
