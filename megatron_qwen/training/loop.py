"""The training loop of every stage: build, resume, train, evaluate, checkpoint, log.

What differs between stages (data, loss, metric names) comes from a
:class:`~megatron_qwen.training.stage.Stage`; everything here is shared.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_qwen.config.params import flops_per_token
from megatron_qwen.config.schema import Config
from megatron_qwen.config.translate import to_transformer_config
from megatron_qwen.data.batches import MicroBatchIterator
from megatron_qwen.data.skips import SkippedSamples
from megatron_qwen.model.build import build_model
from megatron_qwen.platform.device import current_device, peak_memory_gb
from megatron_qwen.platform.parallel import adapt_to_backend
from megatron_qwen.training.checkpointing import checkpoint, ckpt_dirs
from megatron_qwen.training.checkpointing.saver import CheckpointSaver
from megatron_qwen.training.metrics import MetricsWriter, format_line, format_scalars, peak_tflops, throughput
from megatron_qwen.training.moe_metrics import build_moe_metrics, format_moe
from megatron_qwen.training.optim import build_optimizer, build_scheduler, wrap_model
from megatron_qwen.training.resilience import signals, watchdog
from megatron_qwen.training.resilience.faults import FaultInjector
from megatron_qwen.training.resilience.guard import StepGuard, TrainingDiverged, Verdict
from megatron_qwen.training.resilience.manual_gc import ManualGC
from megatron_qwen.training.stage import Stage
from megatron_qwen.training.step import evaluate, train_step
from megatron_qwen.training.window import LogWindow

log = logging.getLogger(__name__)


@dataclass
class BatchPlan:
    """Batch arithmetic derived once from the validated config."""

    train_iters: int
    global_batch_size: int
    micro_batch_size: int
    dp_size: int

    @property
    def num_microbatches(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.dp_size)


def plan_batches(cfg: Config) -> BatchPlan:
    t = cfg.train
    iters = t.train_iters if t.train_iters is not None else math.ceil(t.train_samples / t.global_batch_size)
    return BatchPlan(iters, t.global_batch_size, t.micro_batch_size, cfg.parallel.dp)


def _iterators(dataset, consumed: int, plan: BatchPlan, chunks: int, workers: int = 0,
               skips: Optional[SkippedSamples] = None) -> List[MicroBatchIterator]:
    # Every model chunk (VPP) consumes micro-batches from its own, identical iterator.
    dp_rank = parallel_state.get_data_parallel_rank()
    skipped = skips.batch_skipped if skips is not None and skips.ranges else None
    return [MicroBatchIterator(dataset, consumed, plan.micro_batch_size, dp_rank, plan.dp_size, workers, skipped)
            for _ in range(chunks)]


def _is_logging_rank() -> bool:
    # The last rank sits on the last pipeline stage, where the loss is known.
    return torch.distributed.get_rank() == torch.distributed.get_world_size() - 1


class Trainer:
    """Owns the model, optimizer, data and sinks of one run."""

    def __init__(self, cfg: Config, config_yaml: str, stage: Stage,
                 dog: Optional[watchdog.HangWatchdog] = None) -> None:
        self.cfg, self.config_yaml, self.stage = cfg, config_yaml, stage
        self.watchdog = dog or watchdog.HangWatchdog(Path(cfg.run_dir), 0, None, None)  # disarmed
        self.run_dir = Path(cfg.run_dir)
        self.ckpt_root = self.run_dir / "checkpoints"
        self.plan = plan_batches(cfg)
        self.device = current_device()
        config = to_transformer_config(cfg)
        adapt_to_backend(config)
        model = build_model(cfg.model, config, cfg.train.seed)
        self.model = wrap_model(cfg, model)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_scheduler(cfg, self.optimizer, self.plan.train_iters)
        self.saver = CheckpointSaver(self.ckpt_root, cfg.checkpoint.keep_last, cfg.checkpoint.async_save)
        self.state = self._resume()
        self.skips = SkippedSamples.load(self.run_dir, self.plan.global_batch_size)
        self.guard = StepGuard(cfg.train, self.device, loss_scaler=cfg.precision.dtype == "fp16")
        self.faults = FaultInjector(cfg.debug, self.model)
        train_samples = self.plan.train_iters * self.plan.global_batch_size
        # No validation set is built for a run that never validates (small data may have none).
        validates = cfg.train.eval_interval > 0 or cfg.train.eval_at_start
        valid_samples = cfg.train.eval_iters * self.plan.global_batch_size if validates else 0
        self.train_ds, self.valid_ds = stage.build_datasets(train_samples, valid_samples)
        stage.setup(self.model, self.state.iteration, self.run_dir, (self.train_ds, self.valid_ds))
        self.flops_per_token = flops_per_token(cfg.model, cfg.train.seq_length)
        self.writer: Optional[MetricsWriter] = None
        if _is_logging_rank():  # only this rank computes throughput, so only it needs the peak
            self.writer = MetricsWriter(cfg, self.run_dir, {"config": config_yaml}, self.state.iteration)
            self.peak = peak_tflops(cfg)
        self.moe_metrics = build_moe_metrics(cfg, self.model, self.device)  # None for a dense model
        self.tasks = None
        if cfg.train.eval_tasks:  # lm-eval imports only when asked for
            from megatron_qwen.evaluation.run import TrainingTasks

            self.tasks = TrainingTasks(cfg)

    def _resume(self) -> checkpoint.TrainState:
        # The run's own newest complete checkpoint; an error if it has only damaged ones.
        latest = ckpt_dirs.choose_resume(self.ckpt_root)
        if latest is not None:
            return self._load(latest, with_optimizer=True)
        if self.cfg.checkpoint.load:
            self._load(ckpt_dirs.resolve_load(Path(self.cfg.checkpoint.load)), with_optimizer=False)
        return checkpoint.TrainState()

    def _load(self, path: Path, with_optimizer: bool) -> checkpoint.TrainState:
        return checkpoint.load(path, self.model, self.optimizer, self.scheduler, with_optimizer, self.cfg.model)

    def _save(self) -> None:
        self.saver.save(self.model, self.optimizer, self.scheduler, self.state, self.config_yaml)

    def _train_iterators(self) -> List:
        return self.faults.wrap(_iterators(self.train_ds, self.state.consumed_samples, self.plan, len(self.model),
                                           self.cfg.data.num_workers, self.skips))

    def _evaluate(self) -> None:
        if self.valid_ds is None or self.cfg.train.eval_iters <= 0:
            return
        metrics = evaluate(self.stage, self.model, lambda: _iterators(self.valid_ds, 0, self.plan, len(self.model)),
                           self.cfg.train.eval_iters, self.plan.num_microbatches, self.cfg.train.seq_length,
                           self.plan.micro_batch_size)
        if self.writer is not None:
            values = self.stage.eval_record(metrics)
            self.writer.write({"step": self.state.iteration, **values}, prefix="valid")
            tqdm.write(f"step {self.state.iteration} | validation | {format_scalars(values)}")

    def _evaluate_tasks(self) -> None:
        """train.eval_tasks through lm-eval: ``tasks/<task>/<metric>`` in eval.jsonl (and its sinks)."""
        values = self.tasks(self.model)
        if self.writer is not None:
            self.writer.write({"step": self.state.iteration, **values}, prefix="valid")
            tqdm.write(f"step {self.state.iteration} | lm-eval | {format_scalars(values)}")

    def train(self) -> None:
        """Runs until train_iters, saving at intervals, at the end and on a stop signal.

        Stop signals are recorded from process start (:mod:`megatron_qwen.train` installs the
        handlers before the model is built); the loop polls them collectively before the
        first step and every ``train.stop_check_interval`` steps.
        """
        cfg, plan = self.cfg, self.plan
        if self.state.iteration >= plan.train_iters:
            log.warning("nothing to do: %s already reached train_iters=%d; pass a new run_dir to start afresh",
                        self.ckpt_root, plan.train_iters)
            self._close()
            return
        if signals.should_stop(self.device):  # arrived during start-up: nothing new to save
            log.warning("stop signal received before the first step: exiting without training")
            self._close()
            return
        self.gc = ManualGC(cfg.train.manual_gc_interval)
        self.stop_announced = False
        self.iterators = self._train_iterators()
        bar = tqdm(total=plan.train_iters, initial=self.state.iteration, disable=self.writer is None
                   or not cfg.logging.progress_bar, dynamic_ncols=True, leave=False)
        if cfg.train.eval_at_start and self.state.iteration == 0:
            self._evaluate()
        self.window = LogWindow(self.device)
        self.state.restore_rng()
        while self.state.iteration < plan.train_iters:
            verdict = self._train_one()
            if verdict.rollback:
                self._rollback(verdict.rollback)
                bar.n = self.state.iteration
                continue
            if verdict.stop:
                self._diverged(verdict)
            self.watchdog.beat()
            bar.update(1)
            self.gc.step(self.state.iteration)
            if self._after_step():
                break
        else:
            if cfg.train.eval_interval and self.state.iteration % cfg.train.eval_interval:
                self._evaluate()
            if self.tasks is not None and self.state.iteration % cfg.train.eval_tasks_interval:
                self._evaluate_tasks()
            if cfg.checkpoint.save_at_end and not (cfg.checkpoint.save_interval and
                                                   self.state.iteration % cfg.checkpoint.save_interval == 0):
                self._save()
        bar.close()
        self.gc.close()
        self._close()

    def _train_one(self) -> Verdict:
        """One iteration: a training step, or none for a skipped batch (data.skips)."""
        plan, step = self.plan, self.state.iteration + 1
        self.faults.arm(step)
        trained = not self.skips.batch_skipped(self.state.consumed_samples)
        metrics, grad_norm, applied = None, float("nan"), False
        if trained:
            metrics, grad_norm, applied = train_step(self.stage, self.model, self.optimizer, self.scheduler,
                                                     self.iterators, plan.num_microbatches, self.cfg.train.seq_length,
                                                     plan.micro_batch_size)
        else:
            log.info("step %d: batch skipped (listed in %s)", step, self.run_dir / "skipped_samples.jsonl")
        self.state.iteration = step
        self.state.consumed_samples += plan.global_batch_size
        self.window.add(metrics, grad_norm, applied)
        return self.guard.after_step(step, metrics and metrics["loss"], grad_norm, applied, trained)

    def _rollback(self, reason: str) -> None:
        """Reloads the newest complete checkpoint and skips the batches that spiked."""
        step = self.state.iteration
        self.saver.wait()
        path = ckpt_dirs.choose_resume(self.ckpt_root)
        if path is None or ckpt_dirs.iteration_of(path) >= step:
            log.warning("step %d: no checkpoint before this step to roll back to; continuing", step)
            return
        first = max(ckpt_dirs.iteration_of(path) + 1, step - self.cfg.train.loss_spike.skip_batches + 1)
        for skipped in range(first, step + 1):
            self.skips.add_batch(self.run_dir, skipped, f"loss spike at step {step}: {reason}",
                                 write=torch.distributed.get_rank() == 0)
        self.state = self._load(path, with_optimizer=True)
        log.warning("step %d: rolled back to %s; batches of steps %d-%d skipped", step, path.name, first, step)
        self.guard.rolled_back(self.state.iteration)
        if self.writer is not None:
            self.writer.rewind(self.state.iteration)
        self.iterators = self._train_iterators()
        self.stage.restart_data()
        self.window = LogWindow(self.device)
        self.state.restore_rng()

    def _diverged(self, verdict: Verdict) -> None:
        self._log()
        if verdict.save:
            self._save()
        self._close()
        raise TrainingDiverged(verdict.stop)

    def _after_step(self) -> bool:
        """Logging, evaluation and checkpoints due after a step; True when the run must stop."""
        cfg, it = self.cfg, self.state.iteration
        if it % cfg.logging.log_interval == 0 or it == self.plan.train_iters:
            self._log()
        if cfg.train.eval_interval and it % cfg.train.eval_interval == 0:
            self._evaluate()
        if self.tasks is not None and it % cfg.train.eval_tasks_interval == 0:
            self._evaluate_tasks()
        exit_due = bool(cfg.train.exit_interval) and it % cfg.train.exit_interval == 0
        self._announce_stop(it)
        stop_due = it % cfg.train.stop_check_interval == 0 and signals.should_stop(self.device)
        if it % cfg.train.stop_check_interval == 0:
            self.saver.poll()  # publishes background saves that finished
        if exit_due or stop_due:
            log.warning("stopping at iteration %d (%s): saving and exiting", it,
                        "exit_interval" if exit_due else "signal")
            self._save()
            return True
        if cfg.checkpoint.save_interval and it % cfg.checkpoint.save_interval == 0:
            self._save()
        return False

    def _announce_stop(self, it: int) -> None:
        """Says, once, after which step a stop signal this rank received will take effect."""
        if self.stop_announced or not signals.received_here():
            return
        self.stop_announced = True
        interval = self.cfg.train.stop_check_interval
        log.warning("stop signal received during step %d: the run saves and stops after step %d (stop signals are "
                    "checked every train.stop_check_interval=%d steps)", it, min(-(-it // interval) * interval,
                                                                                  self.plan.train_iters), interval)

    def _close(self) -> None:
        self.saver.close()  # waits for a background save
        if self.writer is not None:
            self.writer.close()

    def _log(self) -> None:
        # NOTE: the metrics window and MoE statistics are reduced over ranks, so every rank takes part.
        metrics, grad_norm, skipped, iters, seconds = self.window.collect()
        moe = self.moe_metrics.collect() if self.moe_metrics is not None else {}
        if self.writer is None:
            return
        tokens = self.stage.window_tokens(metrics, iters, iters - skipped)
        values = self.stage.train_record(metrics) if metrics is not None else {"loss": None}  # all skipped
        record = {"step": self.state.iteration, **values, "lr": self.scheduler.get_lr(
            self.optimizer.param_groups[0]), "grad_norm": grad_norm if math.isfinite(grad_norm) else None,
            "skipped_iters": skipped,
            "consumed_samples": self.state.consumed_samples,
            **throughput(tokens, seconds, self.flops_per_token, torch.distributed.get_world_size(), self.peak),
            "peak_mem_gb": peak_memory_gb(), **moe}
        self.writer.write(record)
        extras = format_scalars({k: v for k, v in values.items() if k != "loss"})
        tqdm.write(format_line(record, self.plan.train_iters) + (f" | {extras}" if extras else "") + format_moe(moe))
