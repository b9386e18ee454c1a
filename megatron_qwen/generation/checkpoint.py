"""Sampling from a checkpoint at a TP layout (what ``tools/generate.py`` runs).

The model is built and loaded the way ``tools/convert.py verify`` does it
(:mod:`megatron_qwen.convert.verify_worker`), so any checkpoint written by ``hf-to-mcore``
or by a training run works, resharded on load to the requested TP size. Under torchrun or
srun this process is one of the ranks (the world size must equal ``tp``); otherwise TP1
runs in this process and TP>1 spawns ``tp`` local ranks (gloo on CPU).
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.convert.run_files import read_model_config, resolve_checkpoint
from megatron_qwen.convert.verify_worker import (Layout, check_layout, join_process_group, layout_config,
                                                 load_model, spawn_ranks)
from megatron_qwen.generation.engine import GenerationError, Rollouts, SamplingParams
from megatron_qwen.generation.sampler import MegatronSampler
from megatron_qwen.platform.launch import detect_process_env, init_process_group
from megatron_qwen.platform.parallel import destroy, init_model_parallel

RESULT_FILE = "rollouts.json"


@dataclass
class GenerateJob:
    """Everything a rank needs (pickled to spawned ranks)."""

    ckpt: Path
    model: ModelConfig
    prompts: List[List[int]]
    params: List[SamplingParams]
    tp: int
    port: int = 0
    out_dir: Optional[Path] = None
    threads: int = 1


def _generate(job: GenerateJob) -> List[Rollouts]:
    """Loads the model on this rank (process group up) and samples once per ``SamplingParams``."""
    cfg = layout_config(job.model, Layout(tp=job.tp), job.tp)
    init_model_parallel(cfg)
    [model] = load_model(job.ckpt, cfg)
    sampler = MegatronSampler(model)
    return [sampler.generate(job.prompts, params) for params in job.params]


def run_rank(rank: int, job: GenerateJob) -> None:
    """Entry point of a spawned rank; rank 0 writes the rollouts to ``job.out_dir``."""
    join_process_group(rank, job.tp, job.port, job.threads)
    try:
        results = _generate(job)
        if rank == 0:
            (job.out_dir / RESULT_FILE).write_text(json.dumps([dataclasses.asdict(r) for r in results]))
    finally:
        destroy()


def _in_process(job: GenerateJob) -> List[Rollouts]:
    penv = detect_process_env()
    if penv.world_size != job.tp:
        raise GenerationError(f"launched with {penv.world_size} ranks but tp={job.tp}; launch tp ranks "
                              f"(torchrun --nproc-per-node {job.tp}) or none (local ranks are spawned)")
    init_process_group(penv)
    try:
        return _generate(job)
    finally:
        destroy()


def _spawned(job: GenerateJob) -> List[Rollouts]:
    with tempfile.TemporaryDirectory(prefix="generate-") as tmp:
        job = dataclasses.replace(job, port=detect_process_env(environ={}).master_port, out_dir=Path(tmp),
                                  threads=max(1, (os.cpu_count() or 1) // job.tp))
        spawn_ranks(run_rank, job, job.tp, "generate")
        return [Rollouts(**r) for r in json.loads((Path(tmp) / RESULT_FILE).read_text())]


def check_prompts(prompts: Sequence[Sequence[int]], vocab_size: int) -> None:
    """Raises unless every prompt is non-empty and its ids fit the model's vocabulary."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token")
    largest = max(max(p) for p in prompts)
    if largest >= vocab_size or min(min(p) for p in prompts) < 0:
        raise GenerationError(f"prompt token id {largest} does not fit the model's vocab_size={vocab_size}; "
                              f"use the tokenizer the model was trained with (--tokenizer)")


def generate_from_checkpoint(ckpt: Path, prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams],
                             tp: int = 1) -> List[Rollouts]:
    """Rollouts of ``prompts`` for each ``SamplingParams``, from ``ckpt`` loaded at ``tp``.

    ``ckpt`` is an ``iter_XXXXXXX`` directory, a run's ``checkpoints/`` directory (its latest
    checkpoint) or a converted checkpoint. Raises a UserError on bad input.
    """
    path = resolve_checkpoint(Path(ckpt))
    model = read_model_config(path)
    check_layout(model, Layout(tp=tp))
    check_prompts(prompts, model.vocab_size)
    for p in params:
        p.check()
    job = GenerateJob(path, model, [list(p) for p in prompts], list(params), tp)
    if tp == 1 or detect_process_env().launcher != "single":
        return _in_process(job)
    return _spawned(job)
