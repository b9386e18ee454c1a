"""The dry-run report: layout, batch arithmetic, parameter counts and memory per GPU.

Pure text from a validated config, so ``train.dry_run=true`` needs neither GPUs nor a
process group and runs on a login node.
"""

from __future__ import annotations

from typing import List

from megatron_qwen.config.memory import GIB, MemoryEstimate, StageMemory, estimate_memory, micro_batch_rows
from megatron_qwen.config.params import count_parameters
from megatron_qwen.config.schema import Config


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
    rows = micro_batch_rows(cfg) // t.micro_batch_size  # sequences per sample (a DPO pair: 2)
    return (f"batch: global {t.global_batch_size} = micro {t.micro_batch_size} x dp {dp} x {microbatches} "
            f"micro-batches | seq {t.seq_length} | {t.global_batch_size * rows * t.seq_length:,} tokens/step "
            f"| {length}")


def _params_line(cfg: Config) -> str:
    counts = count_parameters(cfg.model)
    line = (f"parameters: total {_billions(counts.total)} | embedding {_billions(counts.embedding)} | "
            f"non-embedding {_billions(counts.non_embedding)}")
    if cfg.model.num_experts is not None:
        line += f" | active per token {_billions(counts.active)}"
    return line


def _stage_line(st: StageMemory) -> str:
    return (f"  stage {st.stage}: {_size(st.total)} = weights+grads+optimizer {_size(st.weights_and_optimizer)}"
            f" + activations {_size(st.activations)} + logits {_size(st.logits)} ({_billions(st.params)} params)")


def _memory_lines(estimate: MemoryEstimate) -> List[str]:
    peak = estimate.peak
    return [f"memory per GPU (estimate): {_size(peak.total)} (pipeline stage {peak.stage}, "
            "excluding CUDA context, NCCL buffers and fragmentation)",
            *(_stage_line(st) for st in estimate.stages)]


def format_plan(cfg: Config) -> str:
    """The dry-run report of a validated config (``parallel.dp`` derived)."""
    lines = [f"dry run: {cfg.model.name}, stage {cfg.stage.name}, run_dir {cfg.run_dir}",
             _layout_line(cfg), _batch_line(cfg), _params_line(cfg), *_memory_lines(estimate_memory(cfg))]
    return "\n".join(lines)
