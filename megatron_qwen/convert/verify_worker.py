"""One rank of ``verify``: load the checkpoint the trainer's way at each layout, run a forward pass.

Spawned ranks import this module (and what it imports) only: it stays free of
transformers, whose import alone would cost every rank seconds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig

from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.model.build import build_model
from megatron_qwen.model.context_parallel import gather_sequence, split_batch_for_this_rank
from megatron_qwen.platform.device import current_device
from megatron_qwen.platform.launch import detect_process_env, init_process_group
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training import checkpoint


@dataclass(frozen=True)
class Layout:
    """A parallel layout to verify at; it needs ``tp*pp*ep*cp`` ranks."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep * self.cp


@dataclass
class VerifyJob:
    """Everything a spawned rank needs (pickled to it)."""

    ckpt: Path
    model: ModelConfig
    tokens: torch.Tensor  # [b, s]
    layouts: List[Layout]
    world: int
    port: int
    out_dir: Path
    threads: int = 1
    dtype: str = "fp32"  # fp32 | bf16: the precision our model runs the forward pass in


def _config(job: VerifyJob, layout: Layout) -> Config:
    """A config for ``layout`` in ``job.dtype``; ranks beyond tp*pp run data parallel on the same batch."""
    cfg = Config(model=job.model)
    cfg.precision.dtype = job.dtype
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.cp = layout.tp, layout.pp, layout.ep, layout.cp
    cfg.parallel.dp = job.world // (layout.tp * layout.pp * layout.cp)
    cfg.train.micro_batch_size, cfg.train.seq_length = job.tokens.shape
    cfg.train.global_batch_size = cfg.train.micro_batch_size * cfg.parallel.dp
    return cfg


def _transformer_config(cfg: Config) -> TransformerConfig:
    layers, pp = cfg.model.num_layers, cfg.parallel.pp
    if layers % pp:
        # NOTE: an uneven pipeline split (e.g. 3 layers at PP2): the first stage takes the
        # remainder. The trainer's validate() still asks for num_layers % pp == 0.
        cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(
            cfg.parallel, pp_first_stage_layers=layers // pp + layers % pp))
    return to_transformer_config(cfg)


def _forward(chunks: List[torch.nn.Module], tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [b, s, vocab] on the last pipeline stage, None elsewhere.

    Under context parallelism each CP rank runs its share of the positions (the trainer's
    split) and the logits of the CP group are put back together.
    """
    b, s = tokens.shape
    batch = split_batch_for_this_rank({"tokens": tokens, "positions": torch.arange(s, device=tokens.device)
                                       .expand(b, s)}, None)

    def step(data_iterator, chunk):
        # runtime_gather_output: gather the vocab-parallel logits of all TP ranks.
        return chunk(next(data_iterator), batch["positions"], None, runtime_gather_output=True), None

    for chunk in chunks:
        chunk.eval()
    with torch.no_grad():
        outputs = get_forward_backward_func()(
            forward_step_func=step, data_iterator=iter([batch["tokens"]]), model=chunks[0], num_microbatches=1,
            seq_length=s, micro_batch_size=b, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    return gather_sequence(outputs[0], parallel_state.get_context_parallel_group())  # [b, s, vocab]


def _is_reporter() -> bool:
    return (parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
            and parallel_state.get_data_parallel_rank(with_context_parallel=True) == 0)


def run_rank(rank: int, job: VerifyJob) -> None:
    """Entry point of spawned rank ``rank``; writes ``logits_<i>.pt`` for layout ``i``."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(job.world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job.port))
    torch.set_num_threads(job.threads)
    init_process_group(detect_process_env())
    try:
        for i, layout in enumerate(job.layouts):
            cfg = _config(job, layout)
            init_model_parallel(cfg)
            chunks = build_model(cfg.model, _transformer_config(cfg), cfg.train.seed)
            checkpoint.load(job.ckpt, chunks, None, None, with_optimizer=False)
            logits = _forward(chunks, job.tokens.to(current_device()))
            if _is_reporter():
                torch.save(logits.float().cpu(), job.out_dir / f"logits_{i}.pt")
            parallel_state.destroy_model_parallel()
    finally:
        destroy()
