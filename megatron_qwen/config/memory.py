"""Memory per GPU estimated from the config alone (no model, no process group).

What ``train.dry_run`` reports, so a layout can be checked on a login node before a
multi-node job is queued. The estimate covers what scales with the model and the
batch; it leaves out the CUDA context, NCCL buffers, allocator fragmentation and
Transformer Engine's FP8 weight copies (together a few GB on an H100).

- Weights, gradients and Adam state: bf16 mixed precision with fp32 gradient reduction
  holds 2 (bf16 weight) + 4 (fp32 grad) + 12 (fp32 master weight, Adam m and v) bytes per
  parameter; the distributed optimizer shards the 12 across data-parallel ranks, which
  gives megatron's 6 + 12/dp.
- Activations: what autograd keeps from one micro-batch's forward for its backward,
  per layer, counted tensor by tensor for our layers (and checked against
  ``torch.autograd.graph.saved_tensors_hooks`` on CPU, tests/test_memory_measured.py).
  With e the activation element size (2 in bf16) and n the tokens of a micro-batch:
  each RMSNorm keeps its fp32 copy of the input and the normalized input ((4 + e)*n*h),
  each column-parallel linear its input (e*n*h); attention keeps the QKV output (V is a
  view of it), the rotated Q and K, the output and the log-sum-exp
  (e*n*(3q + 3g) + 4*n*heads, plus RoPE's cos/sin); SwiGLU keeps the fc1 output (2*ffn wide) and fc2 its
  input (3*e*n*ffn; the unfused SwiGLU also keeps silu's output and a copy of the up
  projection, 5*e*n*ffn).
  Sequence parallelism splits the norm and linear inputs over tp, TP splits the rest.
  This is Korthikanti et al. 2022 (arXiv:2205.05198) redone for GQA, SwiGLU, RMSNorm and
  FlashAttention-style attention (no s*s scores, so "selective" recompute saves nothing
  more here); "full" keeps only each layer's input. Measured with the local spec; Transformer
  Engine's fused norm+linear keeps the normalized input once instead of the fp32 copy and
  the linear input, so under TE this counts ~8*n*h bytes per layer too many (conservative).
- Context parallelism: each CP rank holds ``s/cp`` positions of every activation above, plus
  the K and V of the other ``s - s/cp`` positions it all-gathers for attention (kept for the
  layer's backward; TE's ring attention, p2p, holds less; the local attention's additive mask of
  ``e*(s/cp)*s`` bytes per micro-batch is left out). Likewise the local attention's additive mask
  of a packed row (GRPO, packed SFT: ``e*t*t`` bytes per micro-batch of t tokens; TE's THD
  kernels have none).
- In flight: a pipeline stage holds the activations of several micro-batches at once
  (1F1B: pp - rank; interleaved: megatron's warm-up count of model chunks).
- Logits: the last stage keeps the fp32 softmax of one micro-batch for the backward
  (split over tp) and, while the loss is computed, the bf16 logits it came from.
- DPO (stage=dpo): a micro-batch of b pairs is 2b sequences, which doubles activations and
  logits; ``stage.reference=model`` adds a frozen copy of the weights (no gradients, no
  optimizer state: 2 bytes per parameter in bf16). GRPO likewise: G rows per prompt, and a
  reference copy when ``stage.beta > 0``.
- GRPO's rollout (between training passes, so it takes the place of the activations): megatron's
  static KV cache of every row a rank samples together, ``rows x seq_length x layers x 2 x
  kv heads / tp x head dim x element size`` (checked against the allocated cache,
  tests/test_memory_measured.py), and the full-vocabulary fp32 logits of one decode step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

from megatron_qwen.config.params import is_moe_layer, layer_params, layout_stages, pipeline_stage_sizes
from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.shapes import logit_positions, micro_batch_rows, micro_batch_tokens, rollout_rows

GIB = 1024**3
HALF_DTYPES = ("bf16", "fp16")


@dataclass(frozen=True)
class StageMemory:
    """Estimated bytes on one GPU of one pipeline stage."""

    stage: int  # pipeline rank
    params: int  # parameters held by one GPU of this stage
    weights_and_optimizer: float  # weights + gradients + optimizer state
    activations: float
    logits: float
    rollout: float = 0.0  # GRPO: KV cache and decode logits while sampling (no activations then)

    @property
    def total(self) -> float:
        return self.weights_and_optimizer + max(self.activations + self.logits, self.rollout)


@dataclass(frozen=True)
class MemoryEstimate:
    stages: Tuple[StageMemory, ...]

    @property
    def peak(self) -> StageMemory:
        """The stage that needs the most memory (what must fit on the GPU)."""
        return max(self.stages, key=lambda st: st.total)


def stage_layers(num_layers: int, pp: int, vpp: int, rank: int, first: Optional[int] = None,
                 last: Optional[int] = None) -> List[int]:
    """Global layer indices on pipeline rank ``rank``: its chunks rank, rank+pp, ... (VPP),
    or one contiguous block for an uneven pipeline (``first``/``last`` stage sizes)."""
    if first is not None or last is not None:
        sizes = pipeline_stage_sizes(num_layers, pp, first, last)
        return list(range(sum(sizes[:rank]), sum(sizes[: rank + 1])))
    per_chunk = num_layers // (pp * vpp)
    return [c * pp * per_chunk + rank * per_chunk + i for c in range(vpp) for i in range(per_chunk)]


def _layer_split(m: ModelConfig, layer: int) -> Tuple[int, int]:
    """(non-expert, routed-expert) parameters of one layer."""
    total, _ = layer_params(m, layer)
    experts = m.num_experts * 3 * m.hidden_size * m.moe_ffn_hidden_size if is_moe_layer(m, layer) else 0
    return total - experts, experts


def _stage_params(cfg: Config, layers: List[int], first: bool, last: bool) -> Tuple[float, float]:
    """(non-expert, expert) parameters held by one GPU of a stage."""
    m, p = cfg.model, cfg.parallel
    norms = 2 * m.hidden_size  # per layer, replicated on every TP rank; everything else is split
    dense = sum((_layer_split(m, i)[0] - norms) / p.tp + norms for i in layers)
    experts = sum(_layer_split(m, i)[1] for i in layers) / (p.ep * (p.etp or p.tp))
    embedding = m.vocab_size * m.hidden_size / p.tp
    # The output layer lives on the last stage; a tied one is a copy there when pp > 1.
    has_output = not m.tie_word_embeddings or p.pp > 1
    dense += embedding * (int(first) + int(last and has_output)) + (m.hidden_size if last else 0)
    return dense, experts


def grad_bytes(cfg: Config) -> int:
    """Bytes per element of megatron's gradient buffer (what the data-parallel reduce sends)."""
    half = cfg.precision.dtype in HALF_DTYPES
    return 4 if (not half or cfg.precision.grad_reduce_in_fp32) else 2


def bytes_per_param(cfg: Config, shards: int) -> float:
    """Weight + gradient + optimizer bytes per parameter; ``shards`` ranks share the optimizer."""
    half = cfg.precision.dtype in HALF_DTYPES
    weight = 2 if half else 4
    grad = grad_bytes(cfg)
    optimizer = (4 if half else 0) + 8  # fp32 master copy (mixed precision only), Adam m and v
    if cfg.parallel.use_distributed_optimizer:
        optimizer /= shards
    return weight + grad + optimizer


def _reference_bytes(cfg: Config, params: float) -> float:
    """A frozen reference copy of ``params`` parameters (DPO with stage.reference=model, GRPO with
    stage.beta > 0), else 0."""
    dpo_model = cfg.stage.name == "dpo" and cfg.stage.reference == "model"
    if not (dpo_model or (cfg.stage.name == "grpo" and cfg.stage.beta > 0)):
        return 0.0
    return params * (2 if cfg.precision.dtype in HALF_DTYPES else 4)


def _element_size(cfg: Config) -> int:
    return 2 if cfg.precision.dtype in HALF_DTYPES else 4


def _tokens(cfg: Config) -> float:
    """Tokens of one micro-batch on one context-parallel rank."""
    return float(micro_batch_tokens(cfg))


def _ffn_width(m: ModelConfig, layer: int) -> int:
    if is_moe_layer(m, layer):  # every token visits top-k routed experts and the shared one
        return m.moe_router_topk * m.moe_ffn_hidden_size + (m.moe_shared_expert_ffn_hidden_size or 0)
    return m.ffn_hidden_size


def gathered_kv_bytes(cfg: Config) -> float:
    """K and V of the other CP ranks' positions, all-gathered by one layer's attention (0 at cp=1)."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    kv_heads = max(m.num_query_groups // p.tp, 1)  # per TP rank (replicated when fewer than tp)
    return 2.0 * (t.seq_length - t.seq_length / p.cp) * micro_batch_rows(cfg) * kv_heads * m.head_dim * _element_size(cfg)


def rollout_kv_bytes(cfg: Config) -> float:
    """Megatron's static KV cache of a GRPO rollout on one GPU (0 for other stages): K and V of
    every layer for ``rollout_rows`` rows of ``seq_length`` positions (prompt + completion)."""
    m, p = cfg.model, cfg.parallel
    kv_heads = max(m.num_query_groups // p.tp, 1)
    return 2.0 * rollout_rows(cfg) * cfg.train.seq_length * m.num_layers * kv_heads * m.head_dim * _element_size(cfg)


def rollout_bytes(cfg: Config) -> float:
    """Memory of a GRPO rollout beyond the weights: the KV cache and one decode step's
    full-vocabulary fp32 logits (gathered over TP) with their sampling temporaries (x3)."""
    return rollout_kv_bytes(cfg) + 3 * 4.0 * rollout_rows(cfg) * cfg.model.vocab_size if rollout_rows(cfg) else 0.0


def layer_working_bytes(cfg: Config, layer: int) -> float:
    """Activation bytes of one layer's forward for one micro-batch on one GPU (see module doc)."""
    m, p = cfg.model, cfg.parallel
    e, n, h = _element_size(cfg), _tokens(cfg), m.hidden_size
    q, g = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    sp_split = p.tp if p.sp else 1
    norms_and_inputs = 2 * (4 + e) * n * h + 2 * e * n * h + 2 * 4 * n  # + the norms' fp32 rsqrt
    # Fused: fc1's output (2*ffn wide) and fc2's input; unfused, also silu's output and the
    # up projection's copy that megatron's glu() makes (x_linear + glu_linear_offset).
    swiglu = (3 if cfg.train.fusions else 5) * e * n * _ffn_width(m, layer)
    attention = 3 * e * n * (q + g) + 4 * n * m.num_attention_heads
    rope = 4 * e * cfg.train.seq_length / p.cp * m.head_dim  # cos and sin for Q and K, [s, 1, 1, d]
    return norms_and_inputs / sp_split + (attention + swiglu) / p.tp + rope + gathered_kv_bytes(cfg)


def layer_activation_bytes(cfg: Config, layer: int) -> float:
    """Bytes one layer keeps from its forward to its backward, per micro-batch and GPU."""
    p = cfg.parallel
    if p.recompute == "full":  # the layer input only
        return _element_size(cfg) * _tokens(cfg) * cfg.model.hidden_size / (p.tp if p.sp else 1)
    return layer_working_bytes(cfg, layer)


def logits_saved_bytes(cfg: Config) -> float:
    """What the loss keeps for backward on the last stage: the fp32 softmax [n, V/tp], the
    output layer's input and the final norm's tensors."""
    m, p = cfg.model, cfg.parallel
    e, n, scored = _element_size(cfg), _tokens(cfg), logit_positions(cfg)
    final_norm_and_input = ((4 + e) * n * m.hidden_size + 4 * n + e * n * m.hidden_size) / (p.tp if p.sp else 1)
    return 4.0 * scored * m.vocab_size / p.tp + final_norm_and_input + 9 * n  # + int64 targets, bool mask


def logits_peak_bytes(cfg: Config) -> float:
    """:func:`logits_saved_bytes` plus the half-precision logits, alive next to their fp32
    copy while the loss is computed (in fp32 the copy is the logits themselves)."""
    e = _element_size(cfg)
    half = e * logit_positions(cfg) * cfg.model.vocab_size / cfg.parallel.tp if e < 4 else 0.0
    return logits_saved_bytes(cfg) + half


def layout_rank_layers(layout: str, pp: int, rank: int) -> List[int]:
    """Global layer indices on pipeline rank ``rank`` under an explicit layout (its chunks are the
    virtual stages rank, rank+pp, ...; layers are numbered in virtual-stage order)."""
    counts = [stage.count("t") for stage in layout_stages(layout)]
    starts = [sum(counts[:i]) for i in range(len(counts))]
    return [starts[v] + i for v in range(rank, len(counts), pp) for i in range(counts[v])]


def _rank_layers(cfg: Config, rank: int) -> List[int]:
    p = cfg.parallel
    if p.pp_layout is not None:
        return layout_rank_layers(p.pp_layout, p.pp, rank)
    return stage_layers(cfg.model.num_layers, p.pp, p.vpp or 1, rank, p.pp_first_stage_layers,
                        p.pp_last_stage_layers)


def in_flight_layers(cfg: Config, rank: int, num_microbatches: int) -> float:
    """Layer-micro-batches whose activations pipeline rank ``rank`` holds at its peak."""
    p = cfg.parallel
    layers = len(_rank_layers(cfg, rank))
    if p.pp == 1:
        return float(layers)  # one micro-batch at a time: forward then its backward
    if p.vpp is None:
        return float(layers * min(p.pp - rank, num_microbatches))  # 1F1B warm-up + 1
    # megatron's interleaved warm-up: 2*(pp - rank - 1) + (vpp - 1)*pp chunks, plus one.
    chunks = min(2 * (p.pp - rank - 1) + (p.vpp - 1) * p.pp + 1, num_microbatches * p.vpp)
    return float(chunks * layers // p.vpp)


def _stage_memory(cfg: Config, rank: int, num_microbatches: int) -> StageMemory:
    p = cfg.parallel
    layers = _rank_layers(cfg, rank)
    first, last = rank == 0, rank == p.pp - 1
    dense, experts = _stage_params(cfg, layers, first, last)
    expert_dp = p.dp * p.cp * p.tp // (p.ep * (p.etp or p.tp))  # world / (etp * ep * pp)
    weights = dense * bytes_per_param(cfg, p.dp * p.cp) + experts * bytes_per_param(cfg, expert_dp)
    weights += _reference_bytes(cfg, dense + experts)
    per_layer = sum(layer_activation_bytes(cfg, i) for i in layers) / len(layers)
    activations = per_layer * in_flight_layers(cfg, rank, num_microbatches)
    if p.recompute == "full":  # plus the layers being recomputed during a backward
        activations += p.recompute_num_layers * max(layer_working_bytes(cfg, i) for i in layers)
    activations += 8 * _tokens(cfg) if first else 0  # the int64 token ids the embedding keeps
    logits = logits_peak_bytes(cfg) if last else 0.0
    return StageMemory(rank, round(dense + experts), weights, activations, logits, rollout_bytes(cfg))


def estimate_memory(cfg: Config) -> MemoryEstimate:
    """Per-stage memory of a validated config (``parallel.dp`` derived by ``validate``)."""
    p = cfg.parallel
    if p.dp is None:
        raise ValueError("estimate_memory needs a validated config (parallel.dp is unset)")
    num_microbatches = cfg.train.global_batch_size // (cfg.train.micro_batch_size * p.dp)
    return MemoryEstimate(tuple(_stage_memory(cfg, r, num_microbatches) for r in range(p.pp)))
