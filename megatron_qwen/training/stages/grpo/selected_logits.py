"""The output layer at selected positions only: vocab-parallel logits [n, V/tp] of the tokens a loss reads.

megatron's ``GPTModel`` applies its output layer to every position and, without labels, returns
the logits batch first (``logits.transpose(0, 1).contiguous()``): two vocabulary-sized passes
over every row position, prompt and padding included, forward and backward. GRPO's loss reads
only the completion positions (docs/benchmarks.md "GRPO step": ~80% of a CPU step was this
work). :func:`logits_at` runs megatron's own forward (embedding, decoder, final norm) and narrows
the output layer's input to the selected positions with a forward pre-hook on the last pipeline
stage's ``output_layer``, so the matmul and the transpose see ``n`` positions instead of ``b * s``.

Sequence parallel: the decoder's output is then split along the sequence over the TP group; the
hook all-gathers it first (backward: this rank's split of the gradient) and runs the output layer
for that one call without sequence parallel (its input gradient is then all-reduced over TP), as
megatron's own inference path does for its last-token logits.
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region


def unwrap_gpt(model: torch.nn.Module) -> GPTModel:
    """The ``GPTModel`` inside megatron's DDP and ``Float16Module`` wrappers."""
    while not isinstance(model, GPTModel):
        model = model.module
    return model


def _narrowing_hook(where: torch.Tensor):
    """A pre-hook for ``output_layer`` that keeps the hidden states [s, b, h] at ``where`` [b, s]."""
    def hook(layer: torch.nn.Module, args, kwargs):
        hidden = args[0]  # [s, b, h] ([s/tp, b, h] under sequence parallel)
        if layer.sequence_parallel:
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
            layer.sequence_parallel = False  # restored by logits_at after the forward
        selected = hidden.transpose(0, 1)[where]  # [n, h], in the order of logits[where] of [b, s, V]
        return (selected[:, None], *args[1:]), kwargs  # [n, 1, h]: megatron's [s, b, h] with b = 1
    return hook


def logits_at(model: torch.nn.Module, tokens: torch.Tensor, position_ids: torch.Tensor, where: torch.Tensor,
              packed_seq_params: Optional[PackedSeqParams] = None) -> torch.Tensor:
    """Vocab-parallel logits [n, V/tp] at the positions ``where`` [b, s] (bool) of rows ``tokens`` [b, s].

    Equal to ``model(tokens, position_ids, None)[where]`` (same numbers, forward and backward).
    On a pipeline stage without the output layer it returns what megatron's forward returns there
    (the activations the schedule sends on).
    """
    gpt = unwrap_gpt(model)
    if not gpt.post_process:
        return model(tokens, position_ids, None, packed_seq_params=packed_seq_params)
    layer = gpt.output_layer
    sequence_parallel = layer.sequence_parallel
    handle = layer.register_forward_pre_hook(_narrowing_hook(where), with_kwargs=True)
    try:
        logits = model(tokens, position_ids, None, packed_seq_params=packed_seq_params)  # [1, n, V/tp]
    finally:
        handle.remove()
        layer.sequence_parallel = sequence_parallel
    return logits[0]
