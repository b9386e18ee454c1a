"""Batched autoregressive sampling on our megatron ``GPTModel`` (PP=1, any TP).

megatron-core 0.16.1's inference engine allocates its buffers and generator on CUDA, so the
loop is ours; the KV cache is megatron's own static one (``StaticInferenceContext``), which
attention fills layer by layer and which runs on CPU through the compatibility layer.

Prompts of different lengths are left-padded to one block: every row's last prompt token
sits at the same position, so one decode step serves the whole batch. Padded keys are
masked out; RoPE depends only on query-key distances, so a row shifted right by its
padding attends exactly as it would alone. (A padded query may attend to itself only: a
row with no allowed key would give NaN, and NaN values poison the real rows through
``0 * NaN``.)

Under TP the logits are gathered to the full vocabulary on every rank and each rank draws
the same numbers from the caller's seed; the first rank of the TP group then broadcasts
its tokens, so the group cannot diverge even if its logits differed in the last bit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator, List, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext

from megatron_qwen.generation.engine import GenerationError, Rollouts, SamplingParams
from megatron_qwen.generation.sampling import sample_next
from megatron_qwen.platform.device import current_device


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token block [b, p] with each prompt flush right, and which positions are real [b, p]."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for row, prompt in enumerate(prompts):
        if len(prompt):
            tokens[row, width - len(prompt):] = torch.as_tensor(list(prompt), dtype=torch.long)
            valid[row, width - len(prompt):] = True
    return tokens, valid


def causal_padding_mask(valid: torch.Tensor) -> torch.Tensor:
    """Attention mask [b, 1, s, s] for left-padded rows, megatron's convention (True = masked)."""
    s = valid.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool, device=valid.device).tril()
    allowed = causal & valid[:, None, None, :]
    allowed |= torch.eye(s, dtype=torch.bool, device=valid.device)  # a padded query sees itself only
    return ~allowed


def _last_logits(model: torch.nn.Module, tokens: torch.Tensor, start: int, mask: torch.Tensor,
                 context: StaticInferenceContext) -> torch.Tensor:
    """Full-vocabulary logits [b, V] after ``tokens`` [b, s], which sit at positions ``start``, ``start + 1``, ...

    The context makes megatron apply the output layer to the last position only; the
    vocab-parallel logits are gathered over TP (``runtime_gather_output``).
    """
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, mask, inference_context=context, runtime_gather_output=True)  # [b, 1, V]
    return logits[:, -1, :].float()


class _CachedForward:
    """Prefill once, then one token per step against megatron's static KV cache."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int) -> None:
        self.model = model
        self.context = StaticInferenceContext(batch, max_length)

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.valid = valid
        logits = _last_logits(self.model, tokens, 0, causal_padding_mask(valid), self.context)
        self.context.sequence_len_offset = tokens.shape[1]
        self.context.enable_decode_mode()
        return logits

    def step(self, token: torch.Tensor) -> torch.Tensor:  # token: [b]
        self.valid = torch.cat([self.valid, self.valid.new_ones(len(token), 1)], dim=1)
        mask = ~self.valid[:, None, None, :]  # [b, 1, 1, kv]: the new query sees every real key
        offset = self.context.sequence_len_offset
        logits = _last_logits(self.model, token[:, None], offset, mask, self.context)
        self.context.sequence_len_offset = offset + 1
        return logits


class _RecomputeForward:
    """No cache reuse: every step is a fresh prefill of the whole sequence so far (the baseline of
    docs/benchmarks.md). A throw-away context still limits the output layer to the last position."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int) -> None:
        self.model = model

    def prefill(self, tokens: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        self.tokens, self.valid = tokens, valid
        context = StaticInferenceContext(len(tokens), tokens.shape[1])
        return _last_logits(self.model, tokens, 0, causal_padding_mask(valid), context)

    def step(self, token: torch.Tensor) -> torch.Tensor:
        tokens = torch.cat([self.tokens, token[:, None]], dim=1)
        return self.prefill(tokens, torch.cat([self.valid, self.valid.new_ones(len(token), 1)], dim=1))


def _agree_across_tp(tokens: torch.Tensor) -> torch.Tensor:
    """The first TP rank's tokens on every rank of the TP group."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        torch.distributed.broadcast(tokens, src=parallel_state.get_tensor_model_parallel_src_rank(),
                                    group=parallel_state.get_tensor_model_parallel_group())
    return tokens


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (megatron uses the KV cache only outside training) and no autograd; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def check_layout(model: torch.nn.Module) -> None:
    """Raises unless ``model`` and this process's parallel layout support generation."""
    if getattr(getattr(model, "config", None), "sequence_parallel", False):
        raise GenerationError("generation runs without sequence parallel (a decode step holds one token, which "
                              "cannot be split over the TP ranks); set parallel.sp=false")
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    cp = parallel_state.get_context_parallel_world_size()
    if pp > 1 or cp > 1:
        raise GenerationError(f"generation runs at parallel.pp=1 and parallel.cp=1 (any tp), got pp={pp} cp={cp}; "
                              f"load the checkpoint at pp=1 (checkpoints reshard on load)")


class MegatronSampler:
    """:class:`~megatron_qwen.generation.engine.RolloutEngine` on one (unwrapped or DDP) GPTModel chunk.

    ``model`` must hold the whole network on this rank's TP shard (PP=1). Every rank of a TP
    group must call :meth:`generate` with the same prompts and parameters. ``pad_token_id``
    fills masked positions only (any id of the vocabulary does); completions never hold it.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams) -> Rollouts:
        """One completion per prompt; see :class:`SamplingParams` for stopping and seeding."""
        params.check()
        check_layout(self.model)
        if not prompts or min(len(p) for p in prompts) == 0:
            raise GenerationError("every prompt needs at least one token")
        start = time.perf_counter()
        tokens, valid = left_pad(prompts, self.pad_token_id)
        device = current_device()
        forward_cls = _CachedForward if params.use_kv_cache else _RecomputeForward
        forward = forward_cls(self.model, len(prompts), tokens.shape[1] + params.max_new_tokens)
        with _inference_mode(self.model):
            new, lengths, stopped = self._decode(forward, tokens.to(device), valid.to(device), params)
        rollouts = _rollouts(prompts, new.cpu(), lengths.cpu(), stopped.cpu())
        rollouts.seconds = time.perf_counter() - start
        return rollouts

    def _decode(self, forward, tokens: torch.Tensor, valid: torch.Tensor,
                params: SamplingParams) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Generated ids [b, n], each row's completion length [b] and whether it stopped [b]."""
        generator = torch.Generator().manual_seed(params.seed)  # CPU: same draws on every device
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=tokens.device)
        done = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        lengths = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        generated: List[torch.Tensor] = []
        logits = forward.prefill(tokens, valid)  # [b, V]
        for step in range(params.max_new_tokens):
            uniform = torch.rand(len(tokens), generator=generator)
            token = _agree_across_tp(sample_next(logits, params.temperature, params.top_p, uniform))
            generated.append(token.masked_fill(done, self.pad_token_id))
            lengths += (~done).long()
            done |= torch.isin(token, stop_ids)
            if bool(done.all()) or step + 1 == params.max_new_tokens:
                break
            logits = forward.step(generated[-1])
        return torch.stack(generated, dim=1), lengths, done


def _rollouts(prompts: Sequence[Sequence[int]], new: torch.Tensor, lengths: torch.Tensor,
              stopped: torch.Tensor) -> Rollouts:
    """Each row cut to its length (a stopped row ends with its stop token)."""
    completions = [row[:n] for row, n in zip(new.tolist(), lengths.tolist())]
    return Rollouts([list(p) for p in prompts], completions, stopped.tolist())
