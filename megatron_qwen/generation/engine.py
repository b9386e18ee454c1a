"""The rollout-engine interface: token-id prompts in, sampled completions out.

GRPO and ``tools/generate.py`` talk to an engine only through :class:`RolloutEngine`, so an
external engine (vLLM on GPUs, as NeMo-RL and verl use) can replace the in-framework
:class:`~megatron_qwen.generation.sampler.MegatronSampler` without touching the stage:
it has to accept token ids, honour :class:`SamplingParams` and return :class:`Rollouts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Protocol, Sequence, Tuple

from megatron_qwen.data.tokenizer import STOP_TOKEN_IDS
from megatron_qwen.errors import UserError


class GenerationError(UserError):
    """A generation request that cannot run (layout, lengths, parameters); the message says why."""


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one batch of completions.

    ``temperature == 0`` is greedy decoding (top-p is then ignored). A completion ends after
    the first token in ``stop_token_ids`` (which it keeps) or after ``max_new_tokens`` tokens.
    ``seed`` fixes every random draw of the call, on every rank and at every TP size: give
    each call its own seed (e.g. derived from the step) and different data-parallel ranks
    different seeds.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: Tuple[int, ...] = STOP_TOKEN_IDS
    use_kv_cache: bool = True  # False recomputes the whole prefix every step (docs/benchmarks.md)

    def check(self) -> None:
        """Raises :class:`GenerationError` naming the first bad value."""
        if self.max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise GenerationError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p={self.top_p} must be in (0, 1]")


@dataclass
class Rollouts:
    """Completions of a batch of prompts, in prompt order (token ids, no padding)."""

    prompt_ids: List[List[int]]
    completion_ids: List[List[int]]  # each ends with its stop token when ``stopped``
    stopped: List[bool]  # False: cut at max_new_tokens
    seconds: float = 0.0  # wall time of the generate call (rollout tokens/s)

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(c) for c in self.completion_ids)

    @property
    def tokens_per_second(self) -> float:
        """Completion tokens per second of generation."""
        return self.num_completion_tokens / max(self.seconds, 1e-9)


class RolloutEngine(Protocol):
    """Anything that samples completions for token-id prompts."""

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollouts:
        """One completion per prompt (repeat a prompt G times for a GRPO group).

        ``seeds`` (one per prompt) replaces ``params.seed``: each completion is then a
        function of its prompt and its own seed alone, whatever else is in the batch (vLLM's
        per-request seed).
        """
        ...
