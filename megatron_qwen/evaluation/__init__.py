"""Evaluation of our checkpoints with EleutherAI's lm-evaluation-harness, in place at any TP/PP layout.

- :mod:`~megatron_qwen.evaluation.harness`: :class:`MegatronLM`, lm-eval's model interface on our model chunks;
- :mod:`~megatron_qwen.evaluation.registry`: the task definitions shipped in ``tasks/`` (lm-eval YAML over
  local JSONL, nothing downloaded) and the lookup that serves them beside lm-eval's own registry;
- :mod:`~megatron_qwen.evaluation.run`: running tasks on model chunks (training) or on a checkpoint loaded at a
  layout (``tools/evaluate.py``).

Per-domain validation loss is not here: the training loop's validation reports it
(:mod:`megatron_qwen.training.stages.lm`).
"""
