"""Running lm-eval tasks on our model: on the chunks a run trains (``train.eval_tasks``) or on a
checkpoint loaded at a TP/PP layout (``tools/evaluate.py``).

Checkpoints load the way ``tools/generate.py`` loads them (:mod:`megatron_qwen.convert.verify_worker`):
any checkpoint written by ``hf-to-mcore`` or a training run, resharded on load. Under torchrun
or srun this process is one of the ``tp*pp`` ranks; otherwise TP1/PP1 runs in this process and
larger layouts spawn local ranks (gloo on CPU). Every rank runs lm-eval on the same requests;
the first writes the results.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from megatron_qwen.evaluation.registry import check_task_names, offline, task_manager, task_specs

offline()  # before lm-eval imports datasets, which reads the setting once

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.utils import handle_non_serializable  # noqa: E402

from megatron_qwen.config.schema import Config, ModelConfig  # noqa: E402
from megatron_qwen.convert.run_files import checkpoint_tokenizer, read_model_config, resolve_checkpoint  # noqa: E402
from megatron_qwen.convert.verify_worker import (Layout, check_layout, join_process_group,  # noqa: E402
                                                 layout_config, load_model, spawn_ranks)
from megatron_qwen.data.tokenizer import load_tokenizer  # noqa: E402
from megatron_qwen.errors import UserError  # noqa: E402
from megatron_qwen.evaluation.harness import MegatronLM  # noqa: E402
from megatron_qwen.platform.launch import detect_process_env, init_process_group  # noqa: E402
from megatron_qwen.platform.parallel import destroy, init_model_parallel  # noqa: E402
from megatron_qwen.training.step import eval_mode  # noqa: E402

RESULT_FILE = "results.json"


@dataclass
class EvalOptions:
    """lm-eval settings of one evaluation."""

    tasks: List[str]
    limit: Optional[float] = None  # documents per task (a fraction when < 1), lm-eval's --limit
    num_fewshot: Optional[int] = None  # None: each task's own default
    batch_size: int = 8
    max_length: Optional[int] = None  # None: the model's max_position_embeddings (as lm-eval's hf model)
    bootstrap_iters: int = 100000  # lm-eval's default; 0 skips the bootstrapped standard errors
    log_samples: bool = False  # per-request inputs and responses in the results ("samples")


def run_tasks(lm: MegatronLM, options: EvalOptions, keep_rng: bool = False) -> Dict[str, Any]:
    """lm-eval's ``simple_evaluate`` on ``lm``: its results dict (``results``, ``configs``, ...).

    ``keep_rng``: leave torch's (CPU and CUDA), numpy's and Python's global generators as they
    were (lm-eval seeds them), so a training run continues with the same random stream.
    """
    cuda = torch.cuda.is_available()
    states = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None, np.random.get_state(),
              random.getstate()) if keep_rng else None
    try:
        return simple_evaluate(model=lm, tasks=task_specs(options.tasks), num_fewshot=options.num_fewshot,
                               limit=options.limit, bootstrap_iters=options.bootstrap_iters,
                               log_samples=options.log_samples, task_manager=task_manager(options.tasks))
    finally:
        if states is not None:
            torch.set_rng_state(states[0])
            if cuda:
                torch.cuda.set_rng_state_all(states[1])
            np.random.set_state(states[2])
            random.setstate(states[3])


def results_json(results: Dict[str, Any]) -> str:
    """The results as lm-eval's CLI writes them (non-serializable values as strings)."""
    return json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)


def task_record(results: Dict[str, Any]) -> Dict[str, float]:
    """``tasks/<task>/<metric>`` -> value for every numeric metric of lm-eval's results (standard
    errors left out); the metric keeps lm-eval's filter suffix unless it is ``none``."""
    record = {}
    for task, metrics in results["results"].items():
        for key, value in metrics.items():
            metric, _, filter_name = key.partition(",")
            if isinstance(value, (int, float)) and not isinstance(value, bool) and metric != "sample_len" \
                    and "_stderr" not in metric:  # sample_len: documents evaluated, not a metric
                record[f"tasks/{task}/{metric if filter_name in ('', 'none') else key}"] = float(value)
    return record


class TrainingTasks:
    """``train.eval_tasks``: lm-eval on the run's own model chunks, at the training layout.

    Every rank runs the same requests (data-parallel replicas repeat them); the model is in
    eval mode meanwhile and the global random generators are left as they were.
    """

    def __init__(self, cfg: Config) -> None:
        check_task_names(cfg.train.eval_tasks)
        self.tokenizer = load_tokenizer(cfg.data.tokenizer)
        if self.tokenizer.vocab_size > cfg.model.vocab_size:
            raise UserError(f"train.eval_tasks tokenizes with a {self.tokenizer.vocab_size}-token tokenizer but "
                            f"model.vocab_size={cfg.model.vocab_size}; use a model whose embedding covers it "
                            f"(Qwen2.5: 151936) or unset train.eval_tasks")
        self.max_length, self.batch_size = cfg.train.seq_length, cfg.train.micro_batch_size
        self.options = EvalOptions(list(cfg.train.eval_tasks), cfg.train.eval_tasks_limit, bootstrap_iters=0)

    def __call__(self, chunks: Sequence[torch.nn.Module]) -> Dict[str, float]:
        lm = MegatronLM(chunks, self.tokenizer, self.max_length, self.batch_size)
        with eval_mode(list(chunks)), torch.no_grad():
            return task_record(run_tasks(lm, self.options, keep_rng=True))


@dataclass
class CheckpointJob:
    """Everything a rank needs (pickled to spawned ranks)."""

    ckpt: Path
    model: ModelConfig
    layout: Layout
    options: EvalOptions
    tokenizer: Optional[Union[str, Path]] = None
    dtype: str = "fp32"
    port: int = 0
    out_dir: Optional[Path] = None
    threads: int = 1


def _evaluate(job: CheckpointJob) -> Dict[str, Any]:
    """Loads the model on this rank (process group up) and runs the tasks."""
    cfg = layout_config(job.model, job.layout, job.layout.world, dtype=job.dtype)
    init_model_parallel(cfg)
    chunks = load_model(job.ckpt, cfg)
    lm = MegatronLM(chunks, load_tokenizer(job.tokenizer), job.options.max_length or
                    job.model.max_position_embeddings, job.options.batch_size)
    return run_tasks(lm, job.options)


def run_rank(rank: int, job: CheckpointJob) -> None:
    """Entry point of a spawned rank; rank 0 writes the results to ``job.out_dir``."""
    join_process_group(rank, job.layout.world, job.port, job.threads)
    try:
        results = _evaluate(job)
        if rank == 0:
            (job.out_dir / RESULT_FILE).write_text(results_json(results))
    finally:
        destroy()


def _in_process(job: CheckpointJob) -> Dict[str, Any]:
    penv = detect_process_env()
    if penv.world_size != job.layout.world:
        raise UserError(f"launched with {penv.world_size} ranks but tp*pp={job.layout.world}; launch that many "
                         f"ranks (torchrun --nproc-per-node {job.layout.world}) or none (local ranks are spawned)")
    init_process_group(penv)
    try:
        return _evaluate(job)
    finally:
        destroy()


def _spawned(job: CheckpointJob) -> Dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        job = dataclasses.replace(job, port=detect_process_env(environ={}).master_port, out_dir=Path(tmp),
                                  threads=max(1, (os.cpu_count() or 1) // job.layout.world))
        spawn_ranks(run_rank, job, job.layout.world, "evaluate")
        return json.loads((Path(tmp) / RESULT_FILE).read_text())


def evaluate_checkpoint(ckpt: Path, options: EvalOptions, tp: int = 1, pp: int = 1,
                        tokenizer: Optional[Union[str, Path]] = None, dtype: str = "fp32") -> Dict[str, Any]:
    """lm-eval results of ``options.tasks`` on ``ckpt`` (an ``iter_XXXXXXX`` directory, a run's
    ``checkpoints/`` or a converted checkpoint) loaded at ``tp`` x ``pp``, tokenized with ``tokenizer``,
    else the one the checkpoint was converted or trained with. Raises a UserError on bad input,
    before loading anything."""
    path = resolve_checkpoint(Path(ckpt))
    model = read_model_config(path)
    tokenizer = tokenizer or checkpoint_tokenizer(path)
    layout = Layout(tp=tp, pp=pp)
    check_layout(model, layout)
    job = CheckpointJob(path, model, layout, options, tokenizer, dtype)
    if layout.world == 1 or detect_process_env().launcher != "single":
        return _in_process(job)
    return _spawned(job)
