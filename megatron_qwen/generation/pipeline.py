"""One forward-only pass of a token batch through megatron's schedule at any TP/PP layout, its
result on every rank (pipeline-parallel generation, lm-eval scoring).

The schedule sends activations between pipeline stages; the result is computed on the last
stage from the model's output and broadcast over the pipeline group, so every rank of a
model replica continues with the same numbers (decoding needs the next token everywhere).
"""

from __future__ import annotations

from typing import Callable, List, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_qwen.errors import UserError
from megatron_qwen.platform import collectives

# (model chunk, tokens [b, s], position ids [b, s]) -> the chunk's output
ChunkForward = Callable[[torch.nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def check_single_chunk(chunks: Sequence[torch.nn.Module]) -> torch.nn.Module:
    """The one model chunk of this rank; interleaved pipelines (VPP) are not supported here."""
    if len(chunks) != 1:
        raise UserError(f"forward-only passes run one model chunk per rank, got {len(chunks)} (virtual pipeline "
                        f"stages); load the model without parallel.vpp")
    return chunks[0]


def forward_on_all_ranks(chunks: List[torch.nn.Module], tokens: torch.Tensor, forward: ChunkForward,
                         result: Callable[[torch.Tensor], torch.Tensor], shape: Sequence[int],
                         dtype: torch.dtype) -> torch.Tensor:
    """``result(output)`` of the last pipeline stage's output for ``tokens`` [b, s] (positions
    0..s-1), a tensor of ``shape`` and ``dtype``, on every rank of the pipeline group."""
    chunk = check_single_chunk(chunks)
    b, s = tokens.shape
    positions = torch.arange(s, device=tokens.device).expand(b, s)
    computed: List[torch.Tensor] = []

    def step(data_iterator, model):
        output = forward(model, next(data_iterator), positions)

        def keep(output_tensor):  # megatron's loss_func slot: called on the last stage only
            computed.append(result(output_tensor))
            return torch.zeros((), device=tokens.device), torch.ones((), dtype=torch.int, device=tokens.device), {}
        return output, keep

    with torch.no_grad():
        get_forward_backward_func()(forward_step_func=step, data_iterator=iter([tokens]), model=chunk,
                                    num_microbatches=1, seq_length=s, micro_batch_size=b, forward_only=True)
    out = computed[0].to(dtype) if computed else torch.empty(tuple(shape), dtype=dtype, device=tokens.device)
    if parallel_state.get_pipeline_model_parallel_world_size() > 1:
        collectives.broadcast(out, src=parallel_state.get_pipeline_model_parallel_last_rank(),
                              group=parallel_state.get_pipeline_model_parallel_group())
    return out
