"""Convert, train with the trainer at TP2, export: transformers reproduces the trainer's losses."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from megatron_qwen.config.schema import Config
from megatron_qwen.convert.mcore_to_hf import mcore_to_hf
from megatron_qwen.data.batches import collate
from megatron_qwen.data.datasets import build_datasets
from megatron_qwen.data.sft import tokenize_conversation
from megatron_qwen.data.tokenizer import load_tokenizer
from tests.convert_support import make_hf_model
from tests.helpers import QUIET, REPO, losses, read_metrics, run_cli, train_command


def _hf_loss(hf_dir: Path, samples: list) -> float:
    """Token-weighted mean cross entropy of transformers' model on trainer samples."""
    batch = collate(samples)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    with torch.no_grad():
        logits = model(input_ids=batch["tokens"]).logits  # [b, s, vocab]
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    mask = batch["loss_mask"].flatten().float()
    return ((ce * mask).sum() / mask.sum()).item()


def _datasets(run_dir: Path):
    cfg: Config = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Config),
                                                      OmegaConf.load(run_dir / "config.yaml")))
    g = cfg.train.global_batch_size
    train, valid = build_datasets(cfg, cfg.train.train_iters * g, cfg.train.eval_iters * g)
    return [train[i] for i in range(g)], [valid[i] for i in range(g)]


@pytest.mark.slow
@pytest.mark.distributed
def test_train_tp2_from_converted_then_export(tmp_path):
    hf = make_hf_model(tmp_path / "hf", layers=2, hidden=64, ffn=128, heads=4, kv=2, tied=False)
    ckpt = tmp_path / "ckpt"
    proc = run_cli([sys.executable, str(REPO / "tools" / "convert.py"), "hf-to-mcore", "--hf", str(hf),
                    "--out", str(ckpt), "--no-progress"])
    assert f"--config-dir {ckpt}/conf model=converted checkpoint.load={ckpt}" in proc.stdout
    run_dir = tmp_path / "run"
    # Hydra takes --config-dir only before the overrides.
    run_cli(train_command(["--config-dir", str(ckpt / "conf"), "model=converted", f"checkpoint.load={ckpt}",
                           "data=mock", "parallel.tp=2", "train.train_iters=3", "train.seq_length=32",
                           "train.micro_batch_size=2", "train.global_batch_size=4", "train.eval_interval=3",
                           "train.eval_iters=1",
                           "optim.warmup_iters=1", "optim.lr=0.01", "logging.log_interval=1", *QUIET,
                           f"run_dir={run_dir}"], nproc=2))
    records = read_metrics(run_dir)
    first_batch, eval_batch = _datasets(run_dir)
    # Step 1's loss is computed before the first update: the converted weights, loaded at TP2.
    assert _hf_loss(hf, first_batch) == pytest.approx(losses(records)[1], abs=1e-4)
    mcore_to_hf(run_dir / "checkpoints", tmp_path / "exported", progress=False)
    [evaluation] = read_metrics(run_dir, "eval.jsonl")
    assert evaluation["step"] == 3
    assert _hf_loss(tmp_path / "exported", eval_batch) == pytest.approx(evaluation["val_loss"], abs=1e-4)
    assert _hf_loss(hf, eval_batch) != pytest.approx(evaluation["val_loss"], abs=1e-3)  # training moved it
    # The export carries the run's tokenizer (here the default, Qwen2.5's): its own chat template gives
    # exactly the ids our SFT/DPO/GRPO data are rendered into.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "exported")
    chat = [{"role": "user", "content": "Hi <think>"}, {"role": "assistant", "content": "Hello"}]
    assert len(tokenizer) == 151665
    assert tokenizer.apply_chat_template(chat)["input_ids"] == tokenize_conversation(chat, load_tokenizer())[0].tolist()
