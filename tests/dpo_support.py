"""The DPO tests' task: synthetic arithmetic preference pairs with a small BPE tokenizer.

The real Qwen2.5 tokenizer needs a 151,936-row vocabulary, which the multi-rank tests cannot
afford on 2 cores; a byte-level BPE trained on the task's own chat-template text has ~130
tokens (``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` included), so ``model.vocab_size=256``
runs the real data path (chat template, offsets-based masks, preference datasets).
"""

from __future__ import annotations

from pathlib import Path
from typing import List, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from megatron_qwen.data.arithmetic import preference_pairs, sft_conversations
from megatron_qwen.data.preference import pair_messages
from megatron_qwen.data.sft import render
from tests.data_support import write_jsonl

SEQ = 40  # a rendered pair side is 37 tokens with the tokenizer below


def make_tokenizer(directory: Path) -> Path:
    """Trains and saves (``tokenizer.json``) a byte-level BPE on the task's rendered text."""
    texts: List[str] = []
    for pair in preference_pairs(400, seed=99):
        prompt, chosen, rejected = pair_messages(pair)
        texts += [render(prompt + chosen)[0], render(prompt + rejected)[0]]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, show_progress=False,
                                  special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tokenizer.train_from_iterator(texts, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory


def make_task(root: Path, pairs: int = 256, seed: int = 0, max_operand: int = 9) -> dict:
    """Tokenizer, preference pairs and SFT conversations under ``root``; returns their paths."""
    return {"tokenizer": make_tokenizer(root / "tokenizer"),
            "pairs": write_jsonl(root / "pairs.jsonl", preference_pairs(pairs, seed, max_operand, plain_every=4)),
            "sft": write_jsonl(root / "sft.jsonl", sft_conversations(pairs, seed + 1, max_operand))}


TINY_MODEL = ("model=qwen2_5_tiny", "model.vocab_size=256")


def dpo_overrides(task: dict, cache: Path, model: Sequence[str] = TINY_MODEL) -> List[str]:
    """stage=dpo on the task's pairs (fp32; by default the tiny model with vocab 256)."""
    return ["stage=dpo", *model, f"data.tokenizer={task['tokenizer']}",
            f"data.blend=[{{path: '{task['pairs']}', weight: 1.0}}]", f"data.cache_dir={cache}",
            f"train.seq_length={SEQ}", "checkpoint.save_interval=null", "checkpoint.save_at_end=false",
            "logging.log_interval=1", "optim.warmup_iters=1"]


def converted_model(hf: Path) -> List[str]:
    """CLI arguments that train the model converted from ``hf`` (see :func:`convert_start`),
    starting from its weights; Hydra takes ``--config-dir`` before the overrides."""
    ckpt = f"{hf}_mcore"
    return ["--config-dir", f"{ckpt}/conf", "model=converted", f"checkpoint.load={ckpt}"]


def convert_start(root: Path, seed: int) -> Path:
    """A random tiny Qwen2 (vocab 256, 2 layers, hidden 48, 6/2 heads, untied) converted with
    tools/convert.py's hf-to-mcore: a stand-in for an SFT checkpoint. Returns the HF directory;
    the checkpoint is ``<hf>_mcore`` (``model=converted`` under its ``conf/``)."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
    from tests.convert_support import make_hf_model

    hf = make_hf_model(root / f"hf{seed}", seed=seed)
    model = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    with torch.no_grad():  # unit norms: logits of std ~1.4 instead of ~0.2, so the models disagree clearly
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
    model.save_pretrained(hf)
    hf_to_mcore(hf, root / f"hf{seed}_mcore", progress=False)
    return hf
