"""Logit parity between transformers and our Megatron model for the same token batch.

The Megatron side is the trainer's own path: ``build_model`` at the requested TP/PP (and
EP) layout, ``training.checkpointing.checkpoint.load``, and a forward-only pass through megatron's
pipeline schedule, on ``tp*pp*ep`` spawned ranks (gloo and fp32 on CPU). Several layouts
can share one set of ranks (a layout using fewer ranks runs data parallel), which keeps
a multi-layout check to one process start-up. The reference logits come from
``transformers.AutoModelForCausalLM`` in fp32.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence

import torch
import transformers

from megatron_qwen.config.schema import ModelConfig
from megatron_qwen.convert.hf_config import check_same_model, model_config_from_hf, model_name, read_config_json
from megatron_qwen.convert.hf_files import HFWeights
from megatron_qwen.convert.hf_to_mcore import check_hf_tensors
from megatron_qwen.convert.mcore_files import check_compatible, check_complete
from megatron_qwen.convert.mcore_layout import MegatronLayout, single_process_megatron
from megatron_qwen.convert.mcore_to_hf import stored_dtype
from megatron_qwen.convert.run_files import read_model_config, resolve_checkpoint
from megatron_qwen.convert.staging import ConvertError
from megatron_qwen.convert.verify_worker import Layout, VerifyJob, check_layout, run_rank, spawn_ranks
from megatron_qwen.platform.launch import detect_process_env


@dataclass
class Parity:
    """How closely our logits follow transformers' for one layout."""

    layout: Layout
    max_abs_diff: float
    mean_abs_diff: float
    top1_agree: float

    def summary(self) -> dict:
        return {"max_abs_diff": self.max_abs_diff, "mean_abs_diff": self.mean_abs_diff,
                "top1_agree": self.top1_agree, **asdict(self.layout)}


def _world(layouts: Sequence[Layout]) -> int:
    world = max(layout.world for layout in layouts)
    for layout in layouts:
        if world % layout.world:
            raise ConvertError(f"layouts {[asdict(x) for x in layouts]} cannot share {world} ranks")
    return world


def check_inputs(hf_dir: Path, ckpt: Path, model: ModelConfig) -> None:
    """Raises unless the HF weights and the checkpoint are complete and hold exactly the tensors of
    ``model``: bad input fails here, in seconds, not in a spawned rank or after it."""
    check_complete(ckpt)
    weights = HFWeights(hf_dir)
    with single_process_megatron(model):
        layout = MegatronLayout(model, stored_dtype(ckpt))
        check_hf_tensors(layout, weights)
        check_compatible(layout, ckpt, str(hf_dir / "config.json"))


_TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_logits(hf_dir: Path, tokens: torch.Tensor, dtype: str = "fp32") -> torch.Tensor:
    """transformers' logits [b, s, vocab] for ``tokens`` [b, s], computed in ``dtype``, as fp32."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=_TORCH_DTYPES[dtype])
    with torch.no_grad():
        return model(input_ids=tokens).logits.float()


def compare(reference: torch.Tensor, ours: torch.Tensor, layout: Layout) -> Parity:
    """Max/mean absolute difference and top-1 agreement of two logit tensors [b, s, vocab]."""
    diff = (reference - ours).abs()
    agree = (reference.argmax(-1) == ours.argmax(-1)).float().mean()
    return Parity(layout, diff.max().item(), diff.mean().item(), agree.item())


def megatron_logits(ckpt: Path, model: ModelConfig, tokens: torch.Tensor,
                    layouts: Sequence[Layout], dtype: str = "fp32") -> List[torch.Tensor]:
    """Our model's logits [b, s, vocab] at each layout in ``dtype``, from ``world`` spawned ranks."""
    world = _world(layouts)
    with tempfile.TemporaryDirectory(prefix="verify-") as tmp:
        job = VerifyJob(Path(ckpt), model, tokens, list(layouts), world, detect_process_env(environ={}).master_port,
                        Path(tmp), threads=max(1, (os.cpu_count() or 1) // world), dtype=dtype)
        spawn_ranks(run_rank, job, world, "verify")
        return [torch.load(Path(tmp) / f"logits_{i}.pt") for i in range(len(layouts))]


def verify(hf_dir: Path, ckpt: Path, layouts: Sequence[Layout], batch_size: int = 4, seq_len: int = 32,
           seed: int = 0, dtype: str = "fp32") -> List[Parity]:
    """Compares transformers' logits from ``hf_dir`` with ours from ``ckpt`` at each layout.

    The batch holds ``batch_size`` sequences of ``seq_len`` random token ids drawn from ``seed``.
    Both models run in ``dtype`` (fp32, or bf16 as trained on GPUs). Rope scaling is a serving
    choice (``mcore-to-hf --rope-scaling`` adds it to a model trained without): our model runs
    with the HF directory's.
    """
    path = resolve_checkpoint(Path(ckpt))
    hf_model = model_config_from_hf(read_config_json(Path(hf_dir)), model_name(Path(hf_dir)))
    model = dataclasses.replace(read_model_config(path), rope_scaling=hf_model.rope_scaling)
    check_same_model(hf_model, model, str(path))
    if seq_len > model.max_position_embeddings or min(batch_size, seq_len) < 1:
        raise ConvertError(f"batch {batch_size}x{seq_len} does not fit max_position_embeddings="
                           f"{model.max_position_embeddings}")
    for layout in layouts:
        check_layout(model, layout, seq_len)
    check_inputs(Path(hf_dir), path, model)
    tokens = torch.randint(model.vocab_size, (batch_size, seq_len), generator=torch.Generator().manual_seed(seed))
    ours = megatron_logits(path, model, tokens, layouts, dtype)
    reference = hf_logits(Path(hf_dir), tokens, dtype)
    return [compare(reference, logits, layout) for logits, layout in zip(ours, layouts)]


def within(parity: Parity, tolerance: float) -> bool:
    """Whether the max abs diff is within ``tolerance`` (NaN never is)."""
    return not math.isnan(parity.max_abs_diff) and parity.max_abs_diff <= tolerance

