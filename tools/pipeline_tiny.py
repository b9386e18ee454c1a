"""The Qwen2.5 training pipeline in miniature, on CPU: five stages, then a Hugging Face export.

    python tools/pipeline_tiny.py [--out DIR]

Runs ``python -m megatron_qwen.train`` five times, each stage starting from the previous stage's
checkpoint (``checkpoint.load``), on the tiny Qwen2.5 shape with the real tokenizer and
vocabulary (151,936 rows):

1. ``pretrain`` on the embedded corpus (standard-library code and pydoc prose);
2. ``long_context``: continued pretraining on whole source files at twice the sequence length,
   with context parallelism over 2 processes (torch.distributed.run, gloo);
3. ``sft`` on the synthetic sums ("What is a + b?", data/arithmetic.py), packed;
4. ``dpo`` on synthetic preferences of the same task (the right sum over a near miss);
5. ``grpo`` on the same task's prompts with the verifiable ``exact_match`` and ``format`` rewards;

then exports the last checkpoint with ``tools/convert.py mcore-to-hf``, loads it with
transformers and generates an answer. Stages 1-2 run ``experiment=pipeline_tiny`` with the
overrides listed in :func:`stages`; stages 3-5 are the README's post-training commands, the
presets ``experiment=sft_tiny``, ``dpo_tiny`` and ``grpo_tiny`` on the task's files in
``data/tiny/`` (the README starts them from the Quickstart's default job instead of stage 2).
It prints each stage's objective on its validation split before the first step and after the
last: the loss (pretrain, long context, SFT), the reward accuracy (DPO; 0 at the start, where the
policy is its reference and every pair ties) and the mean reward of sampled completions (GRPO).
Everything goes under ``--out`` (default ``runs/pipeline_tiny``): one run directory per stage, the
data cache, ``hf/`` and ``summary.json`` (with each stage's command). About five minutes on 2 CPU cores.
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
TASK_DIR = REPO / "data" / "tiny"  # the synthetic task's files (write_task), read by experiment=*_tiny
DEFAULT_JOB = "runs/qwen2_5_tiny/checkpoints"  # where the README's post-training commands start


@dataclass(frozen=True)
class PipelineStage:
    """One training run of the pipeline: its overrides and the validation metric that is its objective.

    ``steps`` None: the stage's preset (``experiment=<stage>_tiny``, the README's post-training
    commands) sets its length and evaluation; otherwise it runs ``experiment=pipeline_tiny`` with
    the overrides for ``steps`` steps, evaluated before the first and after the last.
    """

    name: str
    steps: Optional[int]
    objective: str  # a key of eval.jsonl: read at step 0 and after the last step
    overrides: Tuple[str, ...]
    nproc: int = 1

    def command(self, run_dir: Path, start: Optional[Path]) -> List[str]:
        """The trainer's arguments (after ``python -m megatron_qwen.train``)."""
        args = [*self.overrides] if self.steps is None else [
            "experiment=pipeline_tiny", *self.overrides, f"train.train_iters={self.steps}",
            f"train.eval_interval={self.steps}"]
        return [*args, *([f"checkpoint.load={start}"] if start else []), f"run_dir={run_dir}"]


def stages() -> List[PipelineStage]:
    """The five stages in order (the checkpoint of each is the start of the next)."""
    return [
        PipelineStage("pretrain", 10, "val_loss", ("stage=pretrain", "data=embedded", "optim.lr=3e-3",
                                                    "optim.min_lr=3e-4", "optim.warmup_iters=2")),
        PipelineStage("long_context", 6, "val_loss", ("stage=long_context", "parallel.cp=2", "train.seq_length=256",
                                                       "train.micro_batch_size=1", "train.global_batch_size=2",
                                                       "optim.lr=1e-3", "optim.min_lr=1e-4", "optim.warmup_iters=1"),
                      nproc=2),
        PipelineStage("sft", None, "val_loss", ("experiment=sft_tiny",)),
        PipelineStage("dpo", None, "rewards/accuracy", ("experiment=dpo_tiny",)),
        PipelineStage("grpo", None, "reward", ("experiment=grpo_tiny",)),
    ]


def write_task(directory: Path) -> Dict[str, Path]:
    """The task's SFT conversations (every second answer tagged), preference pairs and train/validation
    prompts (JSONL): what ``data/tiny/`` holds (``--write-task`` regenerates it; a test compares)."""
    directory.mkdir(parents=True, exist_ok=True)
    files = {name: directory / f"{name}.jsonl" for name in ("sft", "pairs", "prompts", "valid")}
    records = {"sft": sft_conversations(512, seed=1, max_operand=MAX_OPERAND, system=SYSTEM, tagged_every=2),
               "pairs": preference_pairs(128, seed=2, max_operand=MAX_OPERAND, system=SYSTEM)}
    for name, rows in records.items():
        files[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    write_prompts(arithmetic_prompts(256, seed=3, max_operand=MAX_OPERAND, system=SYSTEM), files["prompts"])
    write_prompts(arithmetic_prompts(16, seed=4, max_operand=MAX_OPERAND, system=SYSTEM), files["valid"])
    return files


def _run(cmd: List[str], log: Path, env: Optional[Dict[str, str]] = None) -> None:
    """Runs ``cmd`` from the repo root with its output in ``log``; exits with its tail on failure."""
    # NOTE: transparent huge pages for PyTorch's CPU tensors: the [tokens, 151936] logits are ~100 MB
    # each, and faulting them in 4 KiB pages took as much (system) time as computing them.
    env = {"OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1", **os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    with open(log, "w") as out:
        code = subprocess.run(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT).returncode
    if code != 0:
        sys.exit(f"error: {' '.join(cmd[:6])} ... exited {code}; see {log}:\n" + log.read_text()[-3000:])


def train(stage: PipelineStage, run_dir: Path, start: Optional[Path] = None) -> Tuple[float, float, List[str]]:
    """Runs one stage (from ``start``'s checkpoint); returns its objective at the start and the end, and
    its command's arguments."""
    launcher = [sys.executable] if stage.nproc == 1 else [sys.executable, "-m", "torch.distributed.run",
                                                           "--nproc-per-node", str(stage.nproc)]
    args = stage.command(run_dir, start)
    run_dir.mkdir(parents=True, exist_ok=True)
    _run([*launcher, "-m", "megatron_qwen.train", *args], run_dir / "stdout.log",
         {"MEGATRON_QWEN_CACHE": str(run_dir.parent / "cache")})
    records = [json.loads(line) for line in (run_dir / "eval.jsonl").read_text().splitlines() if line.strip()]
    assert len(records) == 2 and records[0]["step"] == 0, records
    return records[0][stage.objective], records[-1][stage.objective], args


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
    parser.add_argument("--write-task", type=Path, help="write the task's data files there and exit")
    args = parser.parse_args()
    if args.write_task:
        write_task(args.write_task)
        return
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    rows, start = [], None
    for stage in stages():
        first, last, command = train(stage, out / stage.name, start)
        rows.append({"stage": stage.name, "objective": stage.objective, "start": first, "end": last,
                     "command": command})
        print(f"{stage.name:<13} {stage.objective:<17} {first:9.4f} -> {last:9.4f}", flush=True)
        start = out / stage.name / "checkpoints"
    answer = export_and_generate(start, out / "hf")
    (out / "summary.json").write_text(json.dumps({"stages": rows, "question": QUESTION, "answer": answer}, indent=1))
    print(f"transformers, greedy: {QUESTION!r} -> {answer!r} (exported to {out / 'hf'})")


if __name__ == "__main__":
    main()
