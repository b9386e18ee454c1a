"""The stages and their table: ``stage.name`` -> the :class:`Stage` that trains it (the only such table).

``lm.py`` (pretrain, long_context, SFT), ``dpo/`` and ``grpo/`` (each stage with its own math), and
what DPO and GRPO share: the frozen reference (``reference.py``), log-probs of given tokens
(``logprobs.py``) and the no-signal warning (``no_signal.py``).
"""

from __future__ import annotations

from typing import Dict, Type

from megatron_qwen.config.schema import Config
from megatron_qwen.config.validate import ConfigError
from megatron_qwen.training.stage import Stage
from megatron_qwen.training.stages.dpo.stage import DPOStage
from megatron_qwen.training.stages.grpo.stage import GRPOStage
from megatron_qwen.training.stages.lm import LanguageModelStage

STAGES: Dict[str, Type[Stage]] = {
    "pretrain": LanguageModelStage,
    "long_context": LanguageModelStage,  # pretraining with a longer sequence and RoPE settings
    "sft": LanguageModelStage,  # the data (chat conversations, assistant-only loss mask) differs
    "dpo": DPOStage,
    "grpo": GRPOStage,  # online RL: rollouts sampled in before_step, prompts as data
}


def build_stage(cfg: Config) -> Stage:
    """The stage object for ``cfg.stage.name``."""
    if cfg.stage.name not in STAGES:
        raise ConfigError(f"stage.name={cfg.stage.name!r} is not a stage; choose one of {', '.join(STAGES)} "
                          "(e.g. stage=sft)")
    return STAGES[cfg.stage.name](cfg)
