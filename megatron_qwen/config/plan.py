"""The dry-run report: layout, batch arithmetic, parameter counts and memory per GPU.

Pure text from a validated config, so ``train.dry_run=true`` needs neither GPUs nor a
process group and runs on a login node.
"""

from __future__ import annotations

import math
from typing import List

from megatron_qwen.config.memory import GIB, HALF_DTYPES, MemoryEstimate, StageMemory, estimate_memory
from megatron_qwen.config.params import count_parameters
from megatron_qwen.config.schema import Config
from megatron_qwen.config.shapes import micro_batch_rows
from megatron_qwen.config.step_time import Rollout, StepTime, rollout_time, step_seconds, step_time

SAVE_OVERHEAD_S = 60  # barriers, metadata, the rename; and the signal reaching every rank


def _billions(n: float) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n:,.0f}"


def _size(nbytes: float) -> str:
    return f"{nbytes / GIB:.1f} GiB" if nbytes >= GIB else f"{nbytes / 2**20:.1f} MiB"


def _on(flag: bool) -> str:
    return "on" if flag else "off"


def _layout_line(cfg: Config) -> str:
    p = cfg.parallel
    world = p.tp * p.pp * p.cp * p.dp
    vpp = f" (vpp {p.vpp})" if p.vpp else ""
    return (f"layout: tp {p.tp} x pp {p.pp}{vpp} x cp {p.cp} x dp {p.dp} = {world} GPUs | ep {p.ep} | "
            f"sp {_on(p.sp)} | distributed optimizer {_on(p.use_distributed_optimizer)} | "
            f"recompute {p.recompute} | {cfg.precision.dtype}{' + fp8 ' + cfg.precision.fp8 if cfg.precision.fp8 else ''}")


def _batch_line(cfg: Config) -> str:
    t, dp = cfg.train, cfg.parallel.dp
    microbatches = t.global_batch_size // (t.micro_batch_size * dp)
    length = f"{t.train_iters} iterations" if t.train_iters is not None else f"{t.train_samples} samples"
    cp = cfg.parallel.cp
    per_rank = f" ({t.seq_length // cp} per CP rank)" if cp > 1 else ""
    rows = micro_batch_rows(cfg) // t.micro_batch_size  # sequences per sample (a DPO pair: 2)
    return (f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dp} x {microbatches} "
            f"micro-batches | seq {t.seq_length}{per_rank} | {t.global_batch_size * rows * t.seq_length:,} "
            f"tokens/step | {length}")


def _params_line(cfg: Config) -> str:
    counts = count_parameters(cfg.model)
    line = (f"parameters: total {_billions(counts.total)} | embedding {_billions(counts.embedding)} | "
            f"non-embedding {_billions(counts.non_embedding)}")
    if cfg.model.num_experts is not None:
        line += f" | active per token {_billions(counts.active)}"
    return line


def _stage_line(st: StageMemory) -> str:
    working = f"activations {_size(st.activations)} + logits {_size(st.logits)}"
    if st.rollout:  # the rollout and the training passes take turns
        working = f"max({working}, rollout {_size(st.rollout)})"
    return (f"  stage {st.stage}: {_size(st.total)} = weights+grads+optimizer {_size(st.weights_and_optimizer)}"
            f" + {working} ({_billions(st.params)} params)")


def _memory_lines(estimate: MemoryEstimate) -> List[str]:
    peak = estimate.peak
    return [f"memory per GPU (estimate): {_size(peak.total)} (pipeline stage {peak.stage}, "
            "excluding CUDA context, NCCL buffers and fragmentation)",
            *(_stage_line(st) for st in estimate.stages)]


def _peak(cfg: Config) -> float:
    return cfg.cluster.peak_tflops or 989.0


def _step_lines(cfg: Config) -> List[str]:
    """The step-time model's parts (config/step_time.py) and, for GRPO, its rollout."""
    time: StepTime = step_time(cfg, _peak(cfg))
    parts = [f"training {time.train:.2f} s"]
    if time.forward_passes:
        parts.append(f"reference/old log-prob passes {time.forward_passes:.2f} s")
    if time.rollout:
        parts.append(f"rollout {time.rollout:.2f} s")
    lines = [f"step time (model): ~{time.total:.2f} s = {' + '.join(parts)}"]
    if time.setup_seconds:
        lines.append(f"  before the first step: reference log-probs of the pairs (stage.reference=precompute), "
                     f"at most ~{time.setup_seconds:.0f} s")
    if cfg.stage.name == "grpo":
        r: Rollout = rollout_time(cfg, _peak(cfg))
        st = cfg.stage
        lines.append(f"rollout (every {st.updates_per_rollout} step(s)): {r.rows} rows per rank "
                     f"({st.group_size} per prompt) x (prompt <= {cfg.train.seq_length - st.max_new_tokens} + "
                     f"{st.max_new_tokens} new tokens) | prefill {r.prefill:.2f} s + decode {r.decode:.2f} s | "
                     f"KV cache {_size(r.kv_bytes)} per GPU")
    return lines


def checkpoint_bytes(cfg: Config) -> float:
    """Bytes of one checkpoint: the weights, and the optimizer's fp32 main copy (mixed
    precision only) and Adam moments: 14 bytes per parameter in bf16 (72B: ~1 TB), 12 in fp32."""
    per_param = 2 + 4 + 8 if cfg.precision.dtype in HALF_DTYPES else 4 + 8
    return count_parameters(cfg.model).total * per_param


def signal_lead_seconds(cfg: Config) -> int:
    """The ``--signal=USR1@N`` a job needs: after the signal the trainer finishes its step
    (the step-time model of :mod:`megatron_qwen.config.search`), writes a checkpoint at
    ``cluster.checkpoint_write_gbps`` and exits; twice that plus ``SAVE_OVERHEAD_S``, rounded
    up to a minute."""
    write = checkpoint_bytes(cfg) / (cfg.cluster.checkpoint_write_gbps * 1e9)
    step = step_seconds(cfg, _peak(cfg))
    return 60 * math.ceil((2 * (step + write) + SAVE_OVERHEAD_S) / 60)


def _checkpoint_line(cfg: Config) -> str:
    return (f"checkpoint: {checkpoint_bytes(cfg) / 1e12:.2f} TB per save; at {cfg.cluster.checkpoint_write_gbps:g} GB/s "
            f"(cluster.checkpoint_write_gbps) and ~{step_seconds(cfg, _peak(cfg)):.0f} s per "
            f"step, stop-signal lead time: --signal=USR1@{signal_lead_seconds(cfg)} or more")


def format_plan(cfg: Config) -> str:
    """The dry-run report of a validated config (``parallel.dp`` derived)."""
    lines = [f"dry run: {cfg.model.name}, stage {cfg.stage.name}, run_dir {cfg.run_dir}",
             _layout_line(cfg), _batch_line(cfg), _params_line(cfg), *_memory_lines(estimate_memory(cfg)),
             *_step_lines(cfg), _checkpoint_line(cfg)]
    return "\n".join(lines)
