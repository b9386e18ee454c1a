"""Rules of stage=grpo: rollout sampling, the objective's settings, steps per rollout.

Part of :func:`megatron_qwen.config.validate.validate` (same one early pass, same message
style: the numbers and the override that fixes them). Reward names are checked against the
registry when the stage is built (:mod:`megatron_qwen.training.stages.grpo.rewards`), which also happens
before anything is written. Nothing here imports torch.
"""

from __future__ import annotations

import math
from typing import List

from megatron_qwen.config.rules import check
from megatron_qwen.config.schema import Config

ADVANTAGE_STD = ("unbiased", "population", "none")  # training/stages/grpo/loss.py: group_advantages(std=...)
AGGREGATIONS = ("token", "sequence")
GRPO_DATA = "prompts"


def check_grpo_layout(cfg: Config, errors: List[str]) -> None:
    """The in-framework sampler (generation/sampler.py) runs at pp=1, cp=1 (it switches sequence
    parallel off while it decodes, so training may use it)."""
    p = cfg.parallel
    check(errors, p.pp == 1 and p.cp == 1,
           f"stage=grpo samples its rollouts with the in-framework sampler, which runs at parallel.pp=1 and "
           f"parallel.cp=1 (any tp, dp, sp); got pp={p.pp}, cp={p.cp}: set parallel.pp=1 parallel.cp=1")
    check(errors, not p.tp_comm_overlap,
           "parallel.tp_comm_overlap=true: stage=grpo packs its rollouts into rows whose length varies per "
           "micro-batch, and Transformer Engine's userbuffers need one fixed size; set parallel.tp_comm_overlap=false")


def _check_sampling(cfg: Config, errors: List[str]) -> None:
    st, seq = cfg.stage, cfg.train.seq_length
    check(errors, st.group_size >= 2,
           f"stage.group_size={st.group_size} must be >= 2: advantages are rewards relative to the other "
           "completions of the same prompt")
    check(errors, 1 <= st.max_new_tokens < seq,
           f"stage.max_new_tokens={st.max_new_tokens} must be in [1, train.seq_length={seq}) (prompt and "
           "completion share a training row)")
    check(errors, 0 < st.temperature < math.inf,
           f"stage.temperature={st.temperature} must be > 0: a group sampled greedily is {st.group_size} copies "
           "of one completion, whose advantages are all 0")
    check(errors, 0 < st.top_p <= 1, f"stage.top_p={st.top_p} must be in (0, 1]")


def _check_token_budget(cfg: Config, errors: List[str]) -> None:
    """A micro-batch holds whole groups: the budget must fit the largest one (G rows of at most seq tokens)."""
    budget, group, seq = cfg.stage.max_tokens_per_microbatch, cfg.stage.group_size, cfg.train.seq_length
    check(errors, budget is None or budget >= group * seq,
          f"stage.max_tokens_per_microbatch={budget} must be >= stage.group_size*train.seq_length={group}*{seq}="
          f"{group * seq} (a micro-batch holds whole groups of up to seq_length tokens per row); raise it to "
          f"{group * seq} or leave it null (train.micro_batch_size prompts per micro-batch)")


def _check_objective(cfg: Config, errors: List[str]) -> None:
    st = cfg.stage
    check(errors, 0 <= st.clip_low < 1, f"stage.clip_low={st.clip_low} must be in [0, 1) (ratio >= 1 - clip_low)")
    check(errors, 0 <= st.clip_high < math.inf, f"stage.clip_high={st.clip_high} must be >= 0")
    check(errors, 0 <= st.beta < math.inf, f"stage.beta={st.beta} (KL coefficient) must be >= 0")
    check(errors, st.advantage_std in ADVANTAGE_STD,
           f"stage.advantage_std={st.advantage_std!r} must be one of {ADVANTAGE_STD}")
    check(errors, st.aggregation in AGGREGATIONS, f"stage.aggregation={st.aggregation!r} must be one of {AGGREGATIONS}")
    check(errors, bool(st.rewards), "stage.rewards is empty; list at least one, e.g. stage.rewards=[{name: "
           "exact_match, weight: 1.0}]")
    for i, entry in enumerate(st.rewards):
        check(errors, math.isfinite(entry.weight), f"stage.rewards[{i}].weight={entry.weight} must be finite")
    check(errors, st.beta == 0 or st.reference == "model",
           f"stage.reference={st.reference!r}: GRPO's responses are sampled during training, so its reference "
           "log-probs cannot be precomputed; set stage.reference=model (or stage.beta=0: no KL term)")


def _check_updates(cfg: Config, errors: List[str]) -> None:
    """Checkpoints must fall on rollout boundaries: a run resumed in the middle of a rollout batch
    would no longer have the policy that sampled it (its old log-probs)."""
    k, t = cfg.stage.updates_per_rollout, cfg.train
    check(errors, k >= 1, f"stage.updates_per_rollout={k} must be >= 1")
    if k <= 1:
        return
    intervals = {"train.train_iters": t.train_iters, "train.exit_interval": t.exit_interval,
                 "checkpoint.save_interval": cfg.checkpoint.save_interval,
                 "train.stop_check_interval": t.stop_check_interval}
    for name, value in intervals.items():
        check(errors, value is None or value % k == 0,
               f"{name}={value} must be a multiple of stage.updates_per_rollout={k} (a checkpoint must fall "
               f"between rollouts); use {max(k, (value or 0) // k * k)}")
    check(errors, t.train_samples is None,
           f"stage.updates_per_rollout={k} needs train.train_iters (a multiple of {k}), not train.train_samples")


def check_grpo(cfg: Config, errors: List[str]) -> None:
    """Prompt data and stage=grpo go together; GRPO's own settings."""
    kind = cfg.data.type
    if cfg.stage.name != "grpo":
        check(errors, kind != GRPO_DATA,
               f"data.type={GRPO_DATA} holds prompts to sample from, which stage={cfg.stage.name} cannot train on; "
               "use stage=grpo")
        return
    check(errors, kind == GRPO_DATA,
           f"stage=grpo needs prompt data, but data.type={kind}; pick it with data=grpo_example (or another "
           f"conf/data set of type {GRPO_DATA})")
    check_grpo_layout(cfg, errors)
    _check_sampling(cfg, errors)
    _check_token_budget(cfg, errors)
    _check_objective(cfg, errors)
    _check_updates(cfg, errors)
