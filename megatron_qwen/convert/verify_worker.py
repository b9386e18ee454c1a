"""One rank of ``verify``: load the checkpoint the trainer's way at each layout, run a forward pass.

The pieces are public because ``tools/generate.py`` loads checkpoints the same way:
:func:`spawn_ranks` starts gloo/NCCL ranks, :func:`layout_config` and :func:`load_model`
build this rank's model at a layout and load the weights into it.

Spawned ranks import this module (and what it imports) only: it stays free of
transformers, whose import alone would cost every rank seconds.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, List, Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.transformer import TransformerConfig
from torch.multiprocessing import start_processes
from torch.multiprocessing.spawn import ProcessException

from megatron_qwen.config.schema import Config, ModelConfig
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.model.build import build_model
from megatron_qwen.model.context_parallel import gather_sequence, split_batch_for_this_rank
from megatron_qwen.platform.device import current_device
from megatron_qwen.platform.launch import detect_process_env, init_process_group
from megatron_qwen.platform.parallel import destroy, init_model_parallel
from megatron_qwen.training.checkpointing import checkpoint


@dataclass(frozen=True)
class Layout:
    """A parallel layout to load a checkpoint at; it needs ``tp*pp*ep*cp`` ranks."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    cp: int = 1

    @property
    def world(self) -> int:
        return self.tp * self.pp * self.ep * self.cp


def check_layout(model: ModelConfig, layout: Layout, seq_len: int = 0) -> None:
    """Raises unless our model (and a ``seq_len`` batch) can be split at ``layout`` (the trainer's
    rules, plus uneven PP)."""
    problems = [f"{name}={value} must be >= 1" for name, value in asdict(layout).items() if value < 1]
    if not problems:
        divisible = {"num_attention_heads": (model.num_attention_heads, layout.tp),
                     "num_query_groups": (model.num_query_groups, layout.tp),
                     "vocab_size": (model.vocab_size, layout.tp),
                     "num_experts": (model.num_experts or layout.ep, layout.ep)}
        problems = [f"{name}={n} is not divisible by {d}" for name, (n, d) in divisible.items() if n % d]
        if model.num_layers < layout.pp:
            problems.append(f"num_layers={model.num_layers} < pp={layout.pp}")
        if layout.ep > 1 and model.num_experts is None:
            problems.append(f"ep={layout.ep} needs an MoE model")
        if seq_len % (2 * layout.cp):
            problems.append(f"seq_len={seq_len} is not divisible by 2*cp={2 * layout.cp}")
    if problems:
        raise ConvertError(f"cannot split the model at tp={layout.tp} pp={layout.pp} ep={layout.ep} "
                           f"cp={layout.cp}: " + "; ".join(problems))


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


def layout_config(model: ModelConfig, layout: Layout, world: int, micro_batch_size: int = 1,
                  seq_length: int = 1, dtype: str = "fp32") -> Config:
    """A ``dtype`` config for ``layout``; ranks beyond tp*pp*cp run data parallel on the same batch."""
    cfg = Config(model=model)
    cfg.precision.dtype = dtype
    cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.ep, cfg.parallel.cp = layout.tp, layout.pp, layout.ep, layout.cp
    cfg.parallel.dp = world // (layout.tp * layout.pp * layout.cp)
    cfg.train.micro_batch_size, cfg.train.seq_length = micro_batch_size, seq_length
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


def load_model(ckpt: Path, cfg: Config) -> List[torch.nn.Module]:
    """This rank's model chunks at ``cfg``'s layout with the weights of ``ckpt`` (parallel state initialized)."""
    chunks = build_model(cfg.model, _transformer_config(cfg), cfg.train.seed)
    checkpoint.load(ckpt, chunks, None, None, with_optimizer=False)
    return chunks


def join_process_group(rank: int, world: int, port: int, threads: int) -> None:
    """Makes this spawned process rank ``rank`` of a local job of ``world`` ranks."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(threads)
    init_process_group(detect_process_env())


def spawn_ranks(fn: Callable[[int, Any], None], job: Any, world: int, what: str) -> None:
    """Runs ``fn(rank, job)`` on ``world`` spawned processes; a failing rank raises ConvertError."""
    try:
        start_processes(fn, args=(job,), nprocs=world, start_method="spawn")
    except ProcessException as err:
        # The rank's traceback is in the message; its last line names the error.
        raise ConvertError(f"a {what} rank failed: {str(err).strip().splitlines()[-1]}") from err


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
    join_process_group(rank, job.world, job.port, job.threads)
    try:
        for i, layout in enumerate(job.layouts):
            cfg = layout_config(job.model, layout, job.world, *job.tokens.shape, dtype=job.dtype)
            init_model_parallel(cfg)
            logits = _forward(load_model(job.ckpt, cfg), job.tokens.to(current_device()))
            if _is_reporter():
                torch.save(logits.float().cpu(), job.out_dir / f"logits_{i}.pt")
            parallel_state.destroy_model_parallel()
    finally:
        destroy()
