"""The Qwen2.5 training pipeline in miniature, on CPU: five stages, then a Hugging Face export.

    python tools/pipeline_tiny.py [--out DIR]

Runs ``python -m megatron_qwen.train experiment=pipeline_tiny`` five times, each stage starting
from the previous stage's checkpoint (``checkpoint.load``), on the tiny Qwen2.5 shape with the
real tokenizer and vocabulary (151,936 rows):

1. ``pretrain`` on the embedded corpus (standard-library code and pydoc prose);
2. ``long_context``: continued pretraining on whole source files at twice the sequence length,
   with context parallelism over 2 processes (torch.distributed.run, gloo);
3. ``sft`` on the synthetic sums ("What is a + b?", data/arithmetic.py), packed;
4. ``dpo`` on synthetic preferences of the same task (the right sum over a near miss);
5. ``grpo`` on the same task's prompts with the verifiable ``exact_match`` reward;

then exports the last checkpoint with ``tools/convert.py mcore-to-hf``, loads it with
transformers and generates an answer. It prints each stage's objective on its validation split
before the first step and after the last: the loss (pretrain, long context, SFT), the reward
accuracy (DPO; 0 at the start, where the policy is its reference and every pair ties) and the
mean reward of sampled completions (GRPO).
Everything goes under ``--out`` (default ``runs/pipeline_tiny``): the task's data files, one run
directory per stage, ``hf/`` and ``summary.json``. About five minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from megatron_qwen.data.arithmetic import preference_pairs, sft_conversations  # noqa: E402
from megatron_qwen.data.prompts import arithmetic_prompts, render_prompt, write_prompts  # noqa: E402
from megatron_qwen.data.tokenizer import load_tokenizer  # noqa: E402

SYSTEM = "Add the numbers."  # a short system turn keeps the rows short
MAX_OPERAND = 2
QUESTION = "What is 2 + 1?"
# Accuracy plus a smaller reward for the answer format, which the SFT data uses in every second reply.
REWARDS = "stage.rewards=[{name: exact_match, weight: 1.0}, {name: format, weight: 0.5}]"


@dataclass(frozen=True)
class PipelineStage:
    """One training run of the pipeline: its overrides and the validation metric that is its objective."""

    name: str
    steps: int
    objective: str  # a key of eval.jsonl: read at step 0 and after the last step
    overrides: Tuple[str, ...]
    nproc: int = 1


def _blend(path: Path) -> str:
    return f"[{{path: '{path}', weight: 1.0}}]"


def stages(data: Dict[str, Path]) -> List[PipelineStage]:
    """The five stages in order (the checkpoint of each is the start of the next)."""
    constant = ("optim.decay_style=constant", "optim.weight_decay=0.0", "optim.warmup_iters=0")
    return [
        PipelineStage("pretrain", 10, "val_loss", ("stage=pretrain", "data=embedded", "optim.lr=3e-3",
                                                    "optim.min_lr=3e-4", "optim.warmup_iters=2")),
        PipelineStage("long_context", 6, "val_loss", ("stage=long_context", "parallel.cp=2", "train.seq_length=256",
                                                       "train.micro_batch_size=1", "train.global_batch_size=2",
                                                       "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=1"),
                      nproc=2),
        PipelineStage("sft", 40, "val_loss", ("stage=sft", "data=sft_example", f"data.blend={_blend(data['sft'])}",
                                              "train.seq_length=96", *constant, "optim.lr=1e-2", "optim.min_lr=1e-2")),
        PipelineStage("dpo", 8, "rewards/accuracy", ("stage=dpo", f"data.blend={_blend(data['pairs'])}",
                                                     "train.seq_length=32", "train.micro_batch_size=8",
                                                     "train.global_batch_size=8", "train.eval_iters=2", *constant,
                                                     "optim.lr=5e-4", "optim.min_lr=5e-4")),
        PipelineStage("grpo", 10, "reward", ("stage=grpo", f"data.blend={_blend(data['prompts'])}",
                                             f"data.valid_blend={_blend(data['valid'])}", "train.seq_length=40",
                                             "stage.group_size=4", "stage.max_new_tokens=10", REWARDS,
                                             "train.micro_batch_size=4", "train.global_batch_size=8",
                                             "train.eval_iters=2", *constant, "optim.lr=2e-3", "optim.min_lr=2e-3")),
    ]


def write_task(directory: Path) -> Dict[str, Path]:
    """The synthetic task's SFT conversations (every second answer tagged), preference pairs and
    train/validation prompts (JSONL)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.jsonl" for name in ("sft", "pairs", "prompts", "valid")}
    records = {"sft": sft_conversations(512, seed=1, max_operand=MAX_OPERAND, system=SYSTEM, tagged_every=2),
               "pairs": preference_pairs(128, seed=2, max_operand=MAX_OPERAND, system=SYSTEM)}
    for name, rows in records.items():
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_prompts(arithmetic_prompts(256, seed=3, max_operand=MAX_OPERAND, system=SYSTEM), files["prompts"])
    write_prompts(arithmetic_prompts(16, seed=4, max_operand=MAX_OPERAND, system=SYSTEM), files["valid"])
    return files


def _run(cmd: List[str], log: Path) -> None:
    """Runs ``cmd`` from the repo root with its output in ``log``; exits with its tail on failure."""
    # NOTE: transparent huge pages for PyTorch's CPU tensors: the [tokens, 151936] logits are ~100 MB
    # each, and faulting them in 4 KiB pages took as much (system) time as computing them.
    env = {"OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1", **os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... exited {code}; see {log}:\n" + log.read_text()[-3000:])


def train(stage: PipelineStage, run_dir: Path, start: Optional[Path] = None) -> Tuple[float, float]:
    """Runs one stage (from ``start``'s checkpoint); returns its objective at the start and the end."""
    launcher = [sys.executable] if stage.nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                           "--nproc-per-node", str(stage.nproc)]
    load = [f"checkpoint.load={start}"] if start else []
    run_dir.mkdir(parents=True, exist_ok=True)
    _run([*launcher, "-m", "megatron_qwen.train", "experiment=pipeline_tiny", *stage.overrides, *load,
          f"train.train_iters={stage.steps}", f"train.eval_interval={stage.steps}",
          f"data.cache_dir={run_dir.parent / 'cache'}", f"run_dir={run_dir}"], run_dir / "stdout.log")
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    assert [r["step"] for r in records] == [0, stage.steps], records
    return records[0][stage.objective], records[-1][stage.objective]


def export_and_generate(ckpt: Path, hf_dir: Path) -> str:
    """tools/convert.py mcore-to-hf, then transformers loads the export and answers :data:`QUESTION` greedily."""
    _run([sys.executable, "tools/convert.py", "mcore-to-hf", "--ckpt", str(ckpt), "--out", str(hf_dir)],
         hf_dir.parent / "convert.log")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    model, info = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, output_loading_info=True)
    if info["missing_keys"] or info["unexpected_keys"]:
        sys.exit(f"error: transformers loaded {hf_dir} with missing keys {info['missing_keys']} and unexpected "
                 f"keys {info['unexpected_keys']}")
    # The prompt as a server renders it: the export's own chat template, which must give our training ids.
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    if ids["input_ids"][0].tolist() != load_tokenizer().encode(render_prompt(messages)):
        sys.exit(f"error: the chat template exported to {hf_dir} renders the prompt differently from training")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "pipeline_tiny", help="output directory")
    out = parser.parse_args().out.resolve()
    data = write_task(out / "data")
    rows, start = [], None
    for stage in stages(data):
        first, last = train(stage, out / stage.name, start)
        rows.append({"stage": stage.name, "objective": stage.objective, "start": first, "end": last})
        print(f"{stage.name:<13} {stage.objective:<17} {first:9.4f} -> {last:9.4f}", flush=True)
        start = out / stage.name / "checkpoints"
    answer = export_and_generate(start, out / "hf")
    (out / "summary.json").write_text(json.dumps({"stages": rows, "question": QUESTION, "answer": answer}, indent=1))
    print(f"transformers, greedy: {QUESTION!r} -> {answer!r} (exported to {out / 'hf'})")


if __name__ == "__main__":
    main()
