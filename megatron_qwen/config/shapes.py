"""The schedule's micro-batch shape, from the config alone.

One sample of the data becomes ``rows_per_sample`` model rows (a DPO pair: chosen and
rejected; a GRPO prompt: its group of completions), so the tensors megatron's schedule sends
between pipeline stages, and Transformer Engine's userbuffers that must hold exactly one
micro-batch's activations, are ``micro_batch_size * rows_per_sample`` rows of
``seq_length / cp`` positions. The training stages (:class:`megatron_qwen.training.stage.Stage`),
the userbuffers (:func:`megatron_qwen.platform.parallel.init_tp_comm_overlap`) and the memory and
step-time models read these functions, so they cannot disagree.
"""

from __future__ import annotations

from megatron_qwen.config.schema import Config, StageConfig


def rows_per_sample(stage: StageConfig) -> int:
    """Model rows of one sample: 2 for a DPO pair, ``group_size`` for a GRPO prompt, else 1."""
    return {"dpo": 2, "grpo": stage.group_size}.get(stage.name, 1)


def micro_batch_rows(cfg: Config) -> int:
    """Sequences in one micro-batch of the schedule."""
    return cfg.train.micro_batch_size * rows_per_sample(cfg.stage)


def rollout_rows(cfg: Config) -> int:
    """Completions one rank samples together in a GRPO rollout: G per prompt of the
    ``updates_per_rollout`` global batches it covers (0 for other stages)."""
    if cfg.stage.name != "grpo":
        return 0
    st = cfg.stage
    return st.updates_per_rollout * cfg.train.global_batch_size // (cfg.parallel.dp or 1) * st.group_size


def micro_batch_tokens(cfg: Config) -> int:
    """Positions of one micro-batch on one context-parallel rank: the first dimension of its
    [tokens, hidden] activations (TE's userbuffers). GRPO packs its rollouts: with
    ``stage.max_tokens_per_microbatch`` a micro-batch holds at most that many."""
    tokens = cfg.train.seq_length // cfg.parallel.cp * micro_batch_rows(cfg)
    budget = cfg.stage.max_tokens_per_microbatch if cfg.stage.name == "grpo" else None
    return min(tokens, budget) if budget else tokens


def logit_positions(cfg: Config) -> int:
    """Positions of one micro-batch that go through the output layer: GRPO's completion tokens
    only (at most ``max_new_tokens`` per row; training/stages/grpo/selected_logits.py), else every position."""
    tokens = micro_batch_tokens(cfg)
    if cfg.stage.name != "grpo":
        return tokens
    return min(tokens, micro_batch_rows(cfg) * cfg.stage.max_new_tokens)
