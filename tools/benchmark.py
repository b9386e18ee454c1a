"""tools/bench.py's library: our trainer's steady-state step vs. a plain transformers loop.

Our side runs the real training loop (mock data, no checkpoints) for ``2 * steps``
iterations with ``log_interval = steps``, so the second metrics record covers exactly the
``steps`` steady-state iterations after warm-up. The Hugging Face side trains
``Qwen2ForCausalLM`` with ``torch.optim.AdamW`` on the same shapes, global batch and
micro-batching, so the ratio compares the two stacks on identical work.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Dict

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
