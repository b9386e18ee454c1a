"""Sampling on our megatron GPTModel (GRPO rollouts and ``tools/generate.py``).

- :mod:`~megatron_qwen.generation.engine`: the :class:`RolloutEngine` protocol, :class:`SamplingParams`,
  :class:`Rollouts` (what GRPO calls; an external engine such as vLLM would implement the protocol);
- :mod:`~megatron_qwen.generation.sampler`: :class:`MegatronSampler`, batched decoding with megatron's
  static KV cache at any TP (PP=1);
- :mod:`~megatron_qwen.generation.sampling`: greedy / temperature / top-p token choice;
- :mod:`~megatron_qwen.generation.batch`: rollouts as right-padded training rows with the completion mask;
- :mod:`~megatron_qwen.generation.checkpoint`: sampling from a checkpoint at a TP layout.
"""

from megatron_qwen.generation.engine import GenerationError, RolloutEngine, Rollouts, SamplingParams

__all__ = ["GenerationError", "RolloutEngine", "Rollouts", "SamplingParams"]
