"""``train.dry_run_search``: the parallel layouts that fit, ranked by a simple step-time model.

For the config's model, sequence length and global batch at a given world size, every
combination of tp, pp, vpp, micro batch, recompute (and ep for MoE) that ``validate()``
accepts and whose memory estimate (:mod:`megatron_qwen.config.memory`, plus a fixed
reserve) fits ``cluster.gpu_memory_gb`` is timed with :mod:`megatron_qwen.config.step_time`'s
model and listed fastest first. Always on: sequence parallel with tp > 1, the distributed optimizer with both
overlaps. Context parallelism is not searched (not implemented yet).
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import Iterator, List, Optional

from megatron_qwen.config.memory import GIB, estimate_memory
from megatron_qwen.config.params import count_parameters, flops_per_token
from megatron_qwen.config.schema import Config, ParallelConfig
from megatron_qwen.config.shapes import rows_per_sample
from megatron_qwen.config.step_time import EFFICIENCY, step_seconds
from megatron_qwen.config.validate import ConfigError, validate

RESERVE_GIB = 6.0  # CUDA context, NCCL buffers, allocator fragmentation (not in the estimate)
MICRO_BATCHES = (1, 2, 4)
# "selective" is not searched: with FlashAttention-style attention it keeps what "none" keeps
# (measured on CPU: 0.6% less), so it would only duplicate rows.
RECOMPUTE = ("none", "full")


@dataclass(frozen=True)
class Candidate:
    """One valid layout with its estimated peak memory per GPU and step time."""

    cfg: Config
    memory_gib: float
    step_seconds: float

    @property
    def tokens_per_second(self) -> float:
        t = self.cfg.train  # every row of the step (a DPO pair: 2, a GRPO prompt: G)
        return t.global_batch_size * rows_per_sample(self.cfg.stage) * t.seq_length / self.step_seconds


def _divisors(n: int, limit: int) -> List[int]:
    return [d for d in range(1, min(n, limit) + 1) if n % d == 0]


def _layouts(cfg: Config, world: int) -> Iterator[ParallelConfig]:
    m, gpus = cfg.model, cfg.cluster.gpus_per_node
    experts = _divisors(m.num_experts, gpus) if m.num_experts else [1]
    for tp, pp, ep in itertools.product(_divisors(world, gpus), _divisors(world, m.num_layers), experts):
        for vpp in [None, *[v for v in _divisors(m.num_layers // pp, 8) if v > 1 and pp > 1]]:
            yield ParallelConfig(tp=tp, pp=pp, vpp=vpp, ep=ep, sp=tp > 1, use_distributed_optimizer=True,
                                 overlap_grad_reduce=True, overlap_param_gather=True)


def _candidate_configs(cfg: Config, world: int, refusals: List[str]) -> Iterator[Config]:
    """Every searched layout that ``validate()`` accepts; the others' messages go to ``refusals``."""
    for layout, micro, recompute in itertools.product(_layouts(cfg, world), MICRO_BATCHES, RECOMPUTE):
        parallel = dataclasses.replace(layout, recompute=recompute,
                                       recompute_num_layers=cfg.parallel.recompute_num_layers)
        train = dataclasses.replace(cfg.train, micro_batch_size=micro)
        try:
            yield validate(dataclasses.replace(cfg, parallel=parallel, train=train), world)
        except ConfigError as err:
            refusals.append(str(err))


def search_layouts(cfg: Config, world: int, peak_tflops: Optional[float] = None,
                   refusals: Optional[List[str]] = None) -> List[Candidate]:
    """Every valid layout of ``cfg``'s model and batch at ``world`` GPUs that fits
    ``cluster.gpu_memory_gb`` (with ``RESERVE_GIB`` kept free), fastest first. ``refusals``
    collects ``validate()``'s messages for the layouts it refused."""
    peak = peak_tflops or cfg.cluster.peak_tflops or 989.0
    budget = cfg.cluster.gpu_memory_gb - RESERVE_GIB
    found = []
    for candidate in _candidate_configs(cfg, world, [] if refusals is None else refusals):
        memory = estimate_memory(candidate).peak.total / GIB
        if memory <= budget:
            found.append(Candidate(candidate, memory, step_seconds(candidate, peak)))
    return sorted(found, key=lambda c: (c.step_seconds, c.memory_gib))


def _row(c: Candidate, peak: float) -> str:
    p, t = c.cfg.parallel, c.cfg.train
    mfu = c.tokens_per_second * flops_per_token(c.cfg.model, t.seq_length) / (
        p.tp * p.pp * p.cp * p.dp * peak * 1e12)
    return (f"{p.tp:>3} {p.pp:>3} {p.vpp or '-':>4} {p.ep:>3} {p.dp:>4} {t.micro_batch_size:>6} "
            f"{p.recompute:>10} {c.memory_gib:>8.1f} {c.step_seconds:>8.2f} {c.tokens_per_second:>11,.0f} "
            f"{100 * mfu:>9.1f}%")


def format_search(cfg: Config, world: int, top: int = 10) -> str:
    """The ``train.dry_run_search`` report."""
    peak = cfg.cluster.peak_tflops or 989.0
    refusals: List[str] = []
    found = search_layouts(cfg, world, peak, refusals)
    params = count_parameters(cfg.model).total / 1e9
    head = [f"layout search: {cfg.model.name} ({params:.1f}B), {world} GPUs of {cfg.cluster.gpu_memory_gb:.0f} GB "
            f"({RESERVE_GIB:.0f} GiB kept for CUDA/NCCL), seq {cfg.train.seq_length}, global batch "
            f"{cfg.train.global_batch_size}, {cfg.precision.dtype}: {len(found)} layouts fit"]
    if not found:
        refused = f" ({len(refusals)} layouts refused by validate(), e.g. {refusals[0]})" if refusals else ""
        return f"{head[0]}; none fits: more GPUs, a shorter sequence or a smaller global batch{refused}"
    head += [f"top {min(top, len(found))} by modelled step time (compute at {EFFICIENCY:.0%} of {peak:.0f} TFLOP/s, "
             "pipeline bubble, TP/DP/PP traffic; not modelled: kernel efficiency per shape, overlap quality, "
             "network contention; measure before trusting the order):",
             " tp  pp  vpp  ep   dp  micro  recompute  mem GiB   step s    tokens/s  model MFU"]
    return "\n".join(head + [_row(c, peak) for c in found[:top]])
