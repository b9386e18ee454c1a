"""A simple model of one optimizer step's time on H100s, from the config alone.

What ``train.dry_run`` reports, what ``train.dry_run_search`` ranks layouts by and what sizes the
SLURM stop-signal lead time. Treat it as a shortlist to measure, not a prediction. A step is:

- training: model FLOPs of every row of the global batch (a DPO pair is 2 rows, a GRPO prompt
  G, :mod:`megatron_qwen.config.shapes`) / (GPUs x peak x ``EFFICIENCY``); full recompute adds one
  forward (x 4/3); the pipeline bubble multiplies by 1 + (pp - 1) / (vpp x micro-batches);
  TP: per layer and micro-batch 4 all-gathers / reduce-scatters of the activations forward
  and 4 backward, each moving (t-1)/t of them, not overlapped, over NVLink inside a node (MoE
  adds the expert all-to-all the same way); DP: the distributed optimizer's fp32 gradient
  reduce-scatter and bf16 parameter all-gather, ``EXPOSED`` of it not hidden behind compute,
  over NVLink when the DP group fits in a node, else InfiniBand; PP: one activation send per
  model chunk and micro-batch, each way, over InfiniBand (``EXPOSED`` of it under the
  interleaved schedule, which overlaps its p2p);
- forward-only passes over the same rows (a third of the training FLOPs, half its TP traffic):
  the reference model of DPO with ``stage.reference=model`` and of GRPO with ``stage.beta > 0``,
  and GRPO's old log-probs with ``stage.updates_per_rollout > 1``. DPO's ``precompute`` runs its
  pass once before training (:attr:`StepTime.setup_seconds`), not per step;
- GRPO's rollout, once per k = ``updates_per_rollout`` steps and shared by them: the prefill of
  each distinct prompt once (at most ``seq_length - max_new_tokens`` tokens; a group's G rows copy
  its KV cache) at training efficiency, then ``max_new_tokens`` decode steps over all G x prompts
  rows of a rank at once (the in-framework sampler), each bound by reading the rank's weights and
  KV cache from HBM at ``HBM_EFFICIENCY`` of its bandwidth, or by its FLOPs, plus
  ``LAUNCH_S_PER_LAYER`` of kernel launches per layer (eager decoding). An upper bound: rows that
  stop early leave the batch, and prompts are usually shorter.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_qwen.config.memory import HALF_DTYPES, estimate_memory, rollout_kv_bytes
from megatron_qwen.config.params import count_parameters, flops_per_token
from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import micro_batch_rows, rollout_rows, rows_per_sample

EFFICIENCY = 0.5  # fraction of the dense peak the GEMMs reach (Megatron's 8B-70B recipes: ~0.5 MFU)
NVLINK_GBPS = 350.0  # NCCL bus bandwidth inside an H100 node (NVLink 4, 450 GB/s per direction)
IB_GBPS = 45.0  # per GPU across nodes (one 400 Gb/s NIC per GPU)
EXPOSED = 0.2  # share of overlapped traffic (DP gradients/params, p2p under VPP) not hidden by compute
HBM_GBPS = 3350.0  # H100 SXM memory bandwidth
HBM_EFFICIENCY = 0.6  # reached by batched decode GEMVs and attention over the cache
LAUNCH_S_PER_LAYER = 50e-6  # eager decode: ~10 kernels per layer at ~5 us each


@dataclass(frozen=True)
class StepTime:
    """Modelled seconds of one optimizer step, by part."""

    train: float  # forward + backward of the global batch, with its communication
    forward_passes: float  # reference / old log-prob passes
    rollout: float  # GRPO: the rollout's share of this step (its time / updates_per_rollout)
    setup_seconds: float = 0.0  # once per run: DPO's precomputed reference pass

    @property
    def total(self) -> float:
        return self.train + self.forward_passes + self.rollout


def _bandwidth(group_span: int, cfg: Config) -> float:
    """Bytes/s of a collective whose ranks span ``group_span`` consecutive GPUs."""
    return (NVLINK_GBPS if group_span <= cfg.cluster.gpus_per_node else IB_GBPS) * 1e9


def _element(cfg: Config) -> int:
    return 2 if cfg.precision.dtype in HALF_DTYPES else 4


def forward_passes(cfg: Config) -> int:
    """Forward-only passes over every step's rows besides training (reference, old log-probs)."""
    st = cfg.stage
    if st.name == "dpo":
        return int(st.reference == "model")
    if st.name == "grpo":
        return int(st.beta > 0) + int(st.updates_per_rollout > 1)
    return 0


def _compute_and_tp(cfg: Config, peak_tflops: float) -> tuple:
    """(compute seconds, TP/EP bytes per GPU) of one forward + backward of the global batch."""
    m, p, t = cfg.model, cfg.parallel, cfg.train
    world = p.tp * p.pp * p.cp * p.dp
    tokens = t.global_batch_size * rows_per_sample(cfg.stage) * t.seq_length
    compute = tokens * flops_per_token(m, t.seq_length) / (world * peak_tflops * 1e12 * EFFICIENCY)
    microbatches = t.global_batch_size // (t.micro_batch_size * p.dp)
    compute *= 1 + (p.pp - 1) / ((p.vpp or 1) * microbatches)
    activation = micro_batch_rows(cfg) * t.seq_length * m.hidden_size * _element(cfg)  # one micro-batch
    layers_per_gpu = m.num_layers / p.pp
    tp_bytes = 8 * activation * (p.tp - 1) / p.tp * layers_per_gpu * microbatches
    if m.num_experts:  # dispatch and combine, forward and backward, to top-k experts
        tp_bytes += 4 * activation * m.moe_router_topk * (p.ep - 1) / p.ep * layers_per_gpu * microbatches
    return compute, tp_bytes


def _train_seconds(cfg: Config, peak_tflops: float) -> float:
    m, p, t = cfg.model, cfg.parallel, cfg.train
    compute, tp_bytes = _compute_and_tp(cfg, peak_tflops)
    compute *= 4 / 3 if p.recompute == "full" else 1.0
    microbatches = t.global_batch_size // (t.micro_batch_size * p.dp)
    params = estimate_memory(cfg).peak.params
    dp_bytes = params * (4 + 2) * (p.dp - 1) / p.dp * EXPOSED
    activation = micro_batch_rows(cfg) * t.seq_length * m.hidden_size * _element(cfg)
    pp_bytes = 2 * activation / (p.tp if p.sp else 1) * microbatches * (p.vpp or 1) if p.pp > 1 else 0.0
    pp_bytes *= EXPOSED if p.vpp else 1.0  # the interleaved schedule overlaps its p2p (overlap_p2p_comm)
    return (compute + tp_bytes / _bandwidth(p.tp * p.ep, cfg) + dp_bytes / _bandwidth(p.tp * p.dp, cfg)
            + pp_bytes / (IB_GBPS * 1e9))


def _forward_seconds(cfg: Config, peak_tflops: float) -> float:
    """One forward-only pass over the global batch's rows (a third of the FLOPs, half the TP traffic)."""
    compute, tp_bytes = _compute_and_tp(cfg, peak_tflops)
    return compute / 3 + tp_bytes / 2 / _bandwidth(cfg.parallel.tp * cfg.parallel.ep, cfg)


@dataclass(frozen=True)
class Rollout:
    """The modelled rollout of GRPO (zero for other stages): once per ``updates_per_rollout`` steps."""

    rows: int  # completions sampled together on one rank
    prefill: float  # seconds
    decode: float  # seconds, all max_new_tokens steps
    kv_bytes: float  # KV cache of those rows, per GPU

    @property
    def seconds(self) -> float:
        return self.prefill + self.decode


def rollout_time(cfg: Config, peak_tflops: float) -> Rollout:
    """The prefill + decode time and KV cache of one rollout on one rank (see the module doc)."""
    if cfg.stage.name != "grpo":
        return Rollout(0, 0.0, 0.0, 0.0)
    m, p, st = cfg.model, cfg.parallel, cfg.stage
    rows = rollout_rows(cfg)
    prompt = cfg.train.seq_length - st.max_new_tokens  # at most; prompts are usually shorter
    flops = flops_per_token(m, cfg.train.seq_length) / 3  # per token, forward
    rate = p.tp * peak_tflops * 1e12 * EFFICIENCY  # FLOP/s of one TP group
    prefill = rows // st.group_size * prompt * flops / rate  # each distinct prompt once
    weights = count_parameters(m).total / p.tp * _element(cfg)
    kv = rollout_kv_bytes(cfg)
    hbm = HBM_GBPS * 1e9 * HBM_EFFICIENCY
    # The cache grows from the prompt to the full row: on average half the new tokens are in it.
    kv_read = kv * (prompt + st.max_new_tokens / 2) / cfg.train.seq_length
    step = max(rows * flops / rate, (weights + kv_read) / hbm) + LAUNCH_S_PER_LAYER * m.num_layers
    return Rollout(rows, prefill, st.max_new_tokens * step, kv)


def step_time(cfg: Config, peak_tflops: float) -> StepTime:
    """The modelled step of a validated config, by part."""
    passes = _forward_seconds(cfg, peak_tflops)
    setup = 0.0
    if cfg.stage.name == "dpo" and cfg.stage.reference == "precompute":
        iters = cfg.train.train_iters or -(-cfg.train.train_samples // cfg.train.global_batch_size)
        setup = passes * iters  # every pair once (at most one pass per step's pairs)
    rollout = rollout_time(cfg, peak_tflops).seconds / cfg.stage.updates_per_rollout
    return StepTime(_train_seconds(cfg, peak_tflops), forward_passes(cfg) * passes, rollout, setup)


def step_seconds(cfg: Config, peak_tflops: float) -> float:
    """The modelled seconds of one optimizer step of a validated config."""
    return step_time(cfg, peak_tflops).total
