"""Sampling on our megatron GPTModel (GRPO rollouts, ``tools/generate.py``, lm-eval's generate_until).

- :mod:`~megatron_qwen.generation.engine`: the :class:`RolloutEngine` protocol, :class:`SamplingParams`,
  :class:`Rollouts` (what GRPO calls; an external engine such as vLLM would implement the protocol);
- :mod:`~megatron_qwen.generation.sampler`: :class:`MegatronSampler`, batched decoding with megatron's
  static KV cache at any TP (at PP>1 by recomputation through the pipeline schedule);
- :mod:`~megatron_qwen.generation.sampling`: greedy / temperature / top-p token choice;
- :mod:`~megatron_qwen.generation.batch`: rollouts as right-padded training rows with the completion mask;
- :mod:`~megatron_qwen.generation.pipeline`: a forward-only pass through megatron's schedule, its result on every rank;
- :mod:`~megatron_qwen.generation.checkpoint`: sampling from a checkpoint at a TP layout.
"""

from megatron_qwen.generation.engine import GenerationError, RolloutEngine, Rollouts, SamplingParams

__all__ = ["GenerationError", "RolloutEngine", "Rollouts", "SamplingParams"]
