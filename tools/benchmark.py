"""tools/bench.py's library: our trainer's steady-state step vs. a plain transformers loop,
and the training loop's wait per checkpoint save.

Our side runs the real training loop (mock data, no checkpoints) for ``2 * steps``
iterations with ``log_interval = steps``, so the second metrics record covers exactly the
``steps`` steady-state iterations after warm-up. The Hugging Face side trains
``Qwen2ForCausalLM`` with ``torch.optim.AdamW`` on the same shapes, global batch and
micro-batching, so the ratio compares the two stacks on identical work.

The save benchmark (:func:`save_config`, :class:`SaveClock`) runs the same loop with a
checkpoint every ``steps`` steps and times every call the loop makes into the checkpoint
saver: the loop is blocked exactly while it is inside one.
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch
import transformers

from megatron_qwen.config.params import flops_per_token
from megatron_qwen.config.schema import Config
from megatron_qwen.convert.hf_config import hf_config_from_model
from megatron_qwen.platform.device import current_device, peak_memory_gb
from megatron_qwen.training.metrics import peak_tflops, throughput

_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bench_config(cfg: Config, steps: int, run_dir: Path) -> Config:
    """The trainer config of a benchmark run: mock data, no eval, no checkpoints or sinks."""
    return dataclasses.replace(
        cfg,
        run_dir=str(run_dir),
        data=dataclasses.replace(cfg.data, name="mock", type="mock"),
        train=dataclasses.replace(cfg.train, train_iters=2 * steps, train_samples=None, eval_interval=0,
                                  exit_interval=None),
        optim=dataclasses.replace(cfg.optim, warmup_iters=min(cfg.optim.warmup_iters or steps, steps)),
        checkpoint=dataclasses.replace(cfg.checkpoint, save_interval=None, save_at_end=False, load=None),
        logging=dataclasses.replace(cfg.logging, log_interval=steps, wandb_mode="disabled",
                                    tensorboard=False, progress_bar=False),
    )


def bench_hf(cfg: Config, steps: int) -> Dict[str, float]:
    """Steady-state tokens/s, MFU and peak memory of transformers' Qwen2 with torch AdamW."""
    device = current_device()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # on CPU the figure is the process's peak RSS
    dtype = _TORCH_DTYPES[cfg.precision.dtype]
    hf_cfg = transformers.Qwen2Config(**hf_config_from_model(cfg.model, dtype))
    model = transformers.Qwen2ForCausalLM(hf_cfg).to(device=device, dtype=dtype)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
                                  betas=(cfg.optim.adam_beta1, cfg.optim.adam_beta2), eps=cfg.optim.adam_eps)
    t = cfg.train
    micro = t.global_batch_size // t.micro_batch_size  # one process: all micro-batches are local
    gen = torch.Generator().manual_seed(t.seed)
    batch = torch.randint(0, cfg.model.vocab_size, (t.micro_batch_size, t.seq_length), generator=gen).to(device)

    def step() -> None:
        for _ in range(micro):
            (model(input_ids=batch, labels=batch).loss / micro).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.clip_grad)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(steps):  # warm-up: allocator, kernels, optimizer state
        step()
    _synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _synchronize()
    seconds = time.perf_counter() - start
    tokens = steps * t.global_batch_size * t.seq_length
    return {**throughput(tokens, seconds, flops_per_token(cfg.model, t.seq_length), 1, peak_tflops(cfg)),
            "peak_mem_gb": peak_memory_gb()}


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def save_config(cfg: Config, interval: int, saves: int, run_dir: Path) -> Config:
    """:func:`bench_config` with a checkpoint every ``interval`` steps, ``saves`` of them, then
    ``interval - 1`` more steps (in which the last background save finishes and is published);
    stop signals, and with them finished background saves, are polled after every step."""
    base = bench_config(cfg, interval, run_dir)
    iters = (saves + 1) * interval - 1
    return dataclasses.replace(
        base, train=dataclasses.replace(base.train, train_iters=iters, stop_check_interval=1),
        checkpoint=dataclasses.replace(base.checkpoint, save_interval=interval))


class SaveClock:
    """Wall seconds the training loop spends inside the checkpoint saver, charged to the newest save.

    Wraps the saver's methods the loop calls (``save``, ``poll``, ``wait``, ``close``; a call
    made from inside another counts once) and ``ckpt_dirs.publish``, which marks a checkpoint
    complete. Works on any checkout whose saver has these names (the one before a change too).
    """

    METHODS = ("save", "poll", "wait", "close")

    def __init__(self) -> None:
        self.in_save: List[float] = []  # per save: seconds in its save() call
        self.after: List[float] = []  # per save: seconds in later calls until the next save (publish, waits)
        self.previous: List[float] = []  # per save: seconds its save() call spent waiting for the save before
        self.started: List[float] = []
        self.published: List[float] = []
        self.inside = ""  # the saver method the loop is in

    def install(self) -> None:
        from megatron_qwen.training.checkpointing import ckpt_dirs, saver

        for name in self.METHODS:
            setattr(saver.CheckpointSaver, name, self._wrap(getattr(saver.CheckpointSaver, name), name == "save"))
        publish = ckpt_dirs.publish

        def published(*args, **kwargs):
            self.published.append(time.perf_counter())
            return publish(*args, **kwargs)

        ckpt_dirs.publish = published

    def _wrap(self, method: Callable, starts_save: bool) -> Callable:
        @functools.wraps(method)
        def timed(*args, **kwargs):
            if self.inside:  # save() waits for the save before it: charged to save(), also noted apart
                since = time.perf_counter()
                try:
                    return method(*args, **kwargs)
                finally:
                    if self.inside == "save" and method.__name__ == "wait":
                        self.previous[-1] += time.perf_counter() - since
            self.inside, since = method.__name__, time.perf_counter()
            if starts_save:
                self.started.append(since)
                for per_save in (self.in_save, self.after, self.previous):
                    per_save.append(0.0)
            try:
                return method(*args, **kwargs)
            finally:
                self.inside, seconds = "", time.perf_counter() - since
                if starts_save:
                    self.in_save[-1] += seconds
                elif self.after:  # calls before the first save wait for nothing
                    self.after[-1] += seconds
        return timed

    def report(self) -> Dict[str, float]:
        """Per save (the mean over the saves after the first, which also starts megatron's
        writer-results process): the loop's wait, in and after the save call, the part of the
        call spent waiting for the save before (not 0: saves come faster than they are written),
        and the seconds from the save call to the checkpoint's publication."""
        later = slice(1, None) if len(self.in_save) > 1 else slice(None)
        waits = [a + b for a, b in zip(self.in_save, self.after)]
        return {"saves": len(self.in_save), "first_save_wait_s": waits[0],
                "wait_per_save_s": statistics.mean(waits[later]),
                "in_save_call_s": statistics.mean(self.in_save[later]),
                "of_which_previous_save_s": statistics.mean(self.previous[later]),
                "after_save_call_s": statistics.mean(self.after[later]),
                "published_after_s": statistics.mean(p - s for p, s in zip(self.published[later], self.started[later]))}
