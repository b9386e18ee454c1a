"""Hugging Face Qwen2.5 / Qwen2-MoE <-> Megatron checkpoint conversion (``tools/convert.py`` is its CLI).

- :mod:`~megatron_qwen.convert.mapping`: the one HF <-> Megatron weight table;
- :mod:`~megatron_qwen.convert.hf_to_mcore` / :mod:`~megatron_qwen.convert.mcore_to_hf`:
  streaming converters, one tensor or one layer in memory at a time;
- :mod:`~megatron_qwen.convert.verify`: logit parity of transformers vs our model at a layout.

Nothing is imported here: spawned verify ranks import this package and must stay light.
"""
