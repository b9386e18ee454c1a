"""Batched autoregressive sampling on our megatron ``GPTModel`` (any TP and PP).

megatron-core 0.16.1's inference engine allocates its buffers and generator on CUDA, so the
loop is ours; the KV cache is megatron's own static one (``StaticInferenceContext``), which
attention fills layer by layer and which runs on CPU through the compatibility layer.

Prompts of different lengths share one token buffer, each starting at position 0, as in
megatron's static text generation: the batch is prefilled up to the shortest prompt, then
advances one position per step, and a row still inside its prompt takes its prompt token
instead of the sampled one. Attention is therefore plain causal without a padding mask and
every row has its true positions, so any core attention serves it (our SDPA, Transformer
Engine, flash kernels). The cost: the tails of longer prompts pass through the decode steps
one token at a time.

Three things keep the decode loop from paying for rows that do not need it:

- Prefix sharing: identical prompts (a GRPO group is one prompt repeated G times) are prefilled
  once, and the KV cache rows of each are copied to its repeats before the first decode step.
- Finished rows leave the batch: every :data:`CHECK_EVERY` steps the loop looks at which rows
  stopped (the one host sync of the loop: no sync per token) and, if some did, keeps only the
  others' KV cache rows, tokens and state; between two checks a finished row is carried along
  but writes nothing.
- A row's random numbers do not depend on which rows are still in the batch (see
  :func:`uniform_draws`), so leaving the batch changes no completion.

At PP>1 (lm-eval's generate_until on a pipelined checkpoint) every step recomputes the whole
sequence through megatron's schedule, without a KV cache: correct, not fast.

Under TP the logits are gathered to the full vocabulary on every rank and each rank draws
the same numbers from the caller's seed; the first rank of the TP group then broadcasts
its tokens, so the group cannot diverge even if its logits differed in the last bit.
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.utils import get_attr_wrapped_model

from megatron_qwen.generation.engine import GenerationError, Rollouts, SamplingParams
from megatron_qwen.generation.pipeline import forward_on_all_ranks
from megatron_qwen.generation.sampling import sample_next
from megatron_qwen.platform import collectives
from megatron_qwen.platform.device import current_device

# Decode steps between two looks at which rows finished (a device -> host sync each): up to
# CHECK_EVERY - 1 steps of rows that already stopped are wasted, against one sync per token.
CHECK_EVERY = 4


def prompt_buffer(prompts: Sequence[Sequence[int]], pad_id: int,
                  max_new_tokens: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token buffer [b, longest prompt + max_new_tokens], each prompt from position 0; prompt lengths [b]."""
    lengths = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    tokens = torch.full((len(prompts), int(lengths.max()) + max_new_tokens), pad_id, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        tokens[row, : len(prompt)] = torch.as_tensor(list(prompt), dtype=torch.long)
    return tokens, lengths


def _last_logits(model: torch.nn.Module, tokens: torch.Tensor, start: int,
                 context: StaticInferenceContext) -> torch.Tensor:
    """Full-vocabulary logits [b, V] after ``tokens`` [b, s], which sit at positions ``start``, ``start + 1``, ...

    The context makes megatron apply the output layer to the last position only; the
    vocab-parallel logits are gathered over TP (``runtime_gather_output``).
    """
    positions = torch.arange(start, start + tokens.shape[1], device=tokens.device).expand_as(tokens)
    logits = model(tokens, positions, None, inference_context=context, runtime_gather_output=True)  # [b, 1, V]
    return logits[:, -1, :].float()


class _CachedForward:
    """Prefill once, then one token per step against megatron's static KV cache."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int) -> None:
        self.model = model
        self.context = StaticInferenceContext(batch, max_length)

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:  # tokens: [b, s]
        logits = _last_logits(self.model, tokens, 0, self.context)
        self.context.sequence_len_offset = tokens.shape[1]
        self.context.enable_decode_mode()
        return logits

    def select(self, rows: torch.Tensor) -> None:
        """Keeps (or repeats) the cache rows ``rows`` [b'] in that order: the batch becomes b' rows."""
        memory = self.context.key_value_memory_dict
        for layer, (keys, values) in memory.items():  # [max_length, b, heads, head_dim] each
            memory[layer] = (keys[:, rows], values[:, rows])
        self.context.max_batch_size = len(rows)

    def step(self, token: torch.Tensor) -> torch.Tensor:  # token: [b]
        offset = self.context.sequence_len_offset
        logits = _last_logits(self.model, token[:, None], offset, self.context)
        self.context.sequence_len_offset = offset + 1
        return logits


class _RecomputeForward:
    """No cache reuse: every step is a fresh prefill of the whole sequence so far (the baseline of
    docs/benchmarks.md). A throw-away context still limits the output layer to the last position."""

    def __init__(self, model: torch.nn.Module, batch: int, max_length: int) -> None:
        self.model = model

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens
        return _last_logits(self.model, tokens, 0, StaticInferenceContext(*tokens.shape))

    def step(self, token: torch.Tensor) -> torch.Tensor:
        return self.prefill(torch.cat([self.tokens, token[:, None]], dim=1))

    def select(self, rows: torch.Tensor) -> None:
        self.tokens = self.tokens[rows]


class _PipelineForward(_RecomputeForward):
    """Pipeline-parallel decoding: every step recomputes the sequence through megatron's schedule
    (no KV cache across stages) and the last stage's full-vocabulary logits reach every rank."""

    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        self.tokens = tokens
        context = StaticInferenceContext(*tokens.shape)  # the output layer on the last position only

        def forward(chunk, ids, positions):
            return chunk(ids, positions, None, inference_context=context, runtime_gather_output=True)
        vocab = get_attr_wrapped_model(self.model, "vocab_size")  # through DDP / Float16Module wrappers
        return forward_on_all_ranks([self.model], tokens, forward, lambda logits: logits[:, -1, :].float(),
                                    (tokens.shape[0], vocab), torch.float32)


def uniform_draws(seed: int, seeds: Optional[Sequence[int]], rows: int) -> Callable[..., torch.Tensor]:
    """The uniform numbers of one decode step, a fresh set per call: ``draws()`` [rows], or
    ``draws(active)`` those of the rows ``active`` (a list of row indices) only.

    One CPU generator seeded with ``seed`` draws all rows together (all ``rows`` numbers every
    step, so a row's numbers do not depend on ``active``); with ``seeds``, row ``i`` draws from
    its own generator seeded with ``seeds[i]``, so its completion does not depend on which other
    prompts share the batch (GRPO at any data-parallel layout) or are still in it. CPU
    generators give the same numbers on every device.
    """
    if seeds is None:
        generator = torch.Generator().manual_seed(seed)
        return lambda active=None: torch.rand(rows, generator=generator)[slice(None) if active is None else active]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return lambda active=None: torch.cat([torch.rand(1, generator=generators[i])
                                          for i in (range(rows) if active is None else active)])


def shared_prompts(prompts: Sequence[Sequence[int]]) -> Tuple[List[int], List[int]]:
    """(the first row of each distinct prompt, the distinct prompt of each row): a GRPO group's
    G copies of a prompt are prefilled once."""
    first: Dict[Tuple[int, ...], int] = {}
    owner = [first.setdefault(tuple(p), len(first)) for p in prompts]
    return [owner.index(k) for k in range(len(first))], owner


def _agree_across_tp(tokens: torch.Tensor) -> torch.Tensor:
    """The first TP rank's tokens on every rank of the TP group."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        collectives.broadcast(tokens, src=parallel_state.get_tensor_model_parallel_src_rank(),
                              group=parallel_state.get_tensor_model_parallel_group())
    return tokens


@contextlib.contextmanager
def _without_sequence_parallel(model: torch.nn.Module) -> Iterator[None]:
    """The model's TP layers without sequence parallel inside (a decode step holds one token,
    which cannot be split over the TP ranks); restored afterwards.

    Same weights and the same sums: only the activations' layout changes (replicated instead of
    split along the sequence) and with it the collectives (all-reduce instead of reduce-scatter and
    all-gather). megatron's layers keep the switch as ``sequence_parallel`` (linear layers, the
    shared TransformerConfig) and ``reduce_scatter_embeddings`` (the embedding).
    """
    switched = [(obj, name) for module in model.modules() for obj in (module, getattr(module, "config", None))
                for name in ("sequence_parallel", "reduce_scatter_embeddings") if getattr(obj, name, None) is True]
    for obj, name in switched:
        setattr(obj, name, False)
    try:
        yield
    finally:
        for obj, name in switched:
            setattr(obj, name, True)


@contextlib.contextmanager
def _inference_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (megatron uses the KV cache only outside training), no autograd and no sequence
    parallel; restores the mode."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), _without_sequence_parallel(model):
            yield
    finally:
        model.train(was_training)


def check_layout(model: torch.nn.Module) -> None:
    """Raises unless ``model`` and this process's parallel layout support generation."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp > 1:
        raise GenerationError(f"generation runs at parallel.cp=1 (any tp and pp), got cp={cp}; "
                              f"load the checkpoint at cp=1 (checkpoints reshard on load)")


class MegatronSampler:
    """:class:`~megatron_qwen.generation.engine.RolloutEngine` on one (unwrapped or DDP) GPTModel chunk.

    ``model`` is this rank's one model chunk: the whole network on its TP shard, or its
    pipeline stage at PP>1. Every rank of a model replica (TP x PP) must call :meth:`generate`
    with the same prompts and parameters. ``pad_token_id``
    fills buffer positions after a finished row (never attended to by a live row, never in a
    completion); any id of the vocabulary does.
    """

    def __init__(self, model: torch.nn.Module, pad_token_id: int = 0) -> None:
        self.model = model
        self.pad_token_id = pad_token_id

    def generate(self, prompts: Sequence[Sequence[int]], params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollouts:
        """One completion per prompt; see :class:`SamplingParams` for stopping and seeding
        and :class:`~megatron_qwen.generation.engine.RolloutEngine` for ``seeds``."""
        params.check()
        check_layout(self.model)
        if not prompts or min(len(p) for p in prompts) == 0:
            raise GenerationError("every prompt needs at least one token")
        if seeds is not None and len(seeds) != len(prompts):
            raise GenerationError(f"{len(seeds)} seeds for {len(prompts)} prompts; give one seed per prompt")
        start = time.perf_counter()
        tokens, lengths = prompt_buffer(prompts, self.pad_token_id, params.max_new_tokens)
        forward_cls = _CachedForward if params.use_kv_cache else _RecomputeForward
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:
            forward_cls = _PipelineForward
        forward = forward_cls(self.model, len(shared_prompts(prompts)[0]), tokens.shape[1])
        with _inference_mode(self.model):
            tokens = tokens.to(current_device())
            draws = uniform_draws(params.seed, seeds, len(prompts))
            generated, stopped = self._decode(forward, tokens, lengths.to(tokens.device), params, draws)
        rows, ends = tokens.tolist(), (lengths + generated.cpu()).tolist()
        completions = [row[n:end] for row, n, end in zip(rows, lengths.tolist(), ends)]
        rollouts = Rollouts([list(p) for p in prompts], completions, stopped.cpu().tolist())
        rollouts.seconds = time.perf_counter() - start
        return rollouts

    def _decode(self, forward, tokens: torch.Tensor, prompt_lengths: torch.Tensor, params: SamplingParams,
                draws: Callable[..., torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Writes each completion after its prompt into ``tokens`` [b, p + n]; returns the number
        of tokens each row generated [b] and whether it ended with a stop token [b].

        ``active`` lists the rows still in the batch (all at first); every per-row tensor of the
        loop (logits, cache rows) holds those rows in that order.
        """
        stop_ids = torch.tensor(params.stop_token_ids, dtype=torch.long, device=tokens.device)
        generated = torch.zeros(len(tokens), dtype=torch.long, device=tokens.device)
        stopped = torch.zeros(len(tokens), dtype=torch.bool, device=tokens.device)
        first = int(prompt_lengths.min())
        firsts, owner = shared_prompts(tokens[:, :first].tolist())
        logits = forward.prefill(tokens[firsts, :first])  # [u, V]: each distinct prefix once
        owner = torch.tensor(owner, device=tokens.device)
        forward.select(owner)  # its cache rows, once per row that shares it
        logits = logits[owner]  # [b, V]: predicts position `first`
        active = list(range(len(tokens)))
        for step, position in enumerate(range(first, tokens.shape[1]), start=1):
            rows = torch.tensor(active, device=tokens.device)
            sampled = _agree_across_tp(sample_next(logits, params.temperature, params.top_p, draws(active)))
            live = (position >= prompt_lengths[rows]) & ~stopped[rows] & (generated[rows] < params.max_new_tokens)
            tokens[rows, position] = torch.where(live, sampled, tokens[rows, position])  # else prompt (or padding)
            generated[rows] += live.long()
            stopped[rows] |= live & torch.isin(sampled, stop_ids)
            if step % CHECK_EVERY == 0 or position == tokens.shape[1] - 1:
                keep = ((generated[rows] < params.max_new_tokens) & ~stopped[rows]).tolist()  # the host sync
                if not any(keep):
                    break
                if not all(keep):
                    kept = torch.tensor([i for i, k in enumerate(keep) if k], device=tokens.device)
                    forward.select(kept)
                    active = [row for row, k in zip(active, keep) if k]
                    rows = rows[kept]
            logits = forward.step(tokens[rows, position])
        return generated, stopped
