"""GPU acceptance check: every stage on the production path, on one CUDA device, in about 8 minutes.

    python tools/gpu_check.py              # on a GPU node (one H100: within 8 minutes, see BUDGET_S)
    python tools/gpu_check.py --quick      # init + bf16 training + bf16 verify only
    python tools/gpu_check.py --parts dpo_precompute,grpo   # some parts
    python tools/gpu_check.py --allow-cpu  # the same logic on a CPU box (CI; gloo, CI-sized shapes)

On a GPU the process group is NCCL, which (unlike gloo) rejects host tensors in any
collective even in a one-rank group: every part below is a first-day crash a CPU test cannot
see. Each part runs the real command lines in fresh processes, with whichever layer spec
imports (Transformer Engine when it does, else the local spec with PyTorch SDPA):

``init``          the tiny (and, without --quick, the 0.5B) model: norm scales all one, parameter count;
``train``         20 bf16 pretraining steps; the loss must fall;
``sft_packed``    packed SFT (several conversations per row, THD attention), bf16; the loss must fall;
``dpo_precompute`` DPO with ``stage.reference=precompute`` (the DP all-gather of the reference table);
                  the first loss is ln 2 (policy = reference) and the table is stored;
``dpo_model_sft`` DPO with ``stage.reference=model`` and ``stage.sft_weight>0`` (the DP all-reduce of
                  the chosen-token count);
``grpo``          two GRPO steps with rollouts, a KL reference and two updates per rollout;
``long_context``  ``stage=long_context`` at cp=1 on long documents;
``resume``        a sync save, an async save that exits, and the resume: equal to the uninterrupted run;
``generate``      ``tools/generate.py`` greedy on a converted model = transformers' greedy completion;
``verify``        ``tools/convert.py verify`` of a converted model in bf16 against transformers;
``bench``         ``tools/bench.py`` for Qwen2.5-0.5B and 1.5B against transformers (not with --quick).

The last stdout line is one JSON object with one entry per part (its numbers, ``seconds`` and,
on a GPU, ``over_budget`` when it took longer than its share of the 8 minutes); the exit code is
0 only if every part passed. Subprocesses keep the caller's ``PYTHONPATH`` (packages carried to
a GPU host with ``pip install --target``). CI runs ``--allow-cpu``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Sequence

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VERIFY_TOLERANCE = 0.05  # max |logit| difference in bf16 (CPU measures ~0.01 on the tiny model)
VERIFY_TOP1 = 0.95  # fraction of positions whose argmax agrees
RESUME_REL = {"cpu": 0.0, "cuda": 1e-3}  # resumed vs uninterrupted loss; CUDA attention backward may use atomics
# Seconds per part on one H100 (warm page cache; each includes ~10-20 s of process start-up):
# the whole run stays within 8 minutes.
BUDGET_S = {"init": 40, "train": 35, "sft_packed": 30, "dpo_precompute": 35, "dpo_model_sft": 35, "grpo": 45,
            "long_context": 30, "resume": 80, "generate": 35, "verify": 35}
BENCH = {  # model -> overrides: sequence 4096 as the published anchors (docs/benchmarks.md)
    "qwen2_5_0_5b": ["train.seq_length=4096", "train.micro_batch_size=2", "train.global_batch_size=8"],
    "qwen2_5_1_5b": ["train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=4"],
}
QUIET = ["train.eval_interval=0", "logging.log_interval=1", "checkpoint.save_interval=null",
         "checkpoint.save_at_end=false", "logging.wandb_mode=disabled", "logging.tensorboard=false",
         "logging.progress_bar=false"]


@dataclass
class Context:
    """Where the parts write and how large they run."""

    tmp: Path
    cpu: bool

    def size(self, gpu: Sequence[str], cpu: Sequence[str]) -> List[str]:
        """The GPU overrides, or the CPU ones with --allow-cpu (the same logic, CI-sized)."""
        return list(cpu if self.cpu else gpu)

    @property
    def half(self) -> str:
        """bf16 on the GPU; fp32 for the stage parts on CPU, whose bf16 matmuls are ~10x slower
        (``train`` keeps bf16 there: the mixed-precision optimizer path)."""
        return "precision=fp32" if self.cpu else "precision=bf16"


def _env() -> Dict[str, str]:
    kept = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *([kept] if kept else [])])}


def _run(cmd: List[str], timeout: int = 900) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=timeout)


def _checked(cmd: List[str], what: str, timeout: int = 900) -> subprocess.CompletedProcess:
    proc = _run(cmd, timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc


def _last_json(proc: subprocess.CompletedProcess) -> Dict:
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args[:4])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _train(ctx: Context, name: str, overrides: Sequence[str]) -> List[Dict]:
    """``python -m megatron_qwen.train`` in ``<tmp>/<name>``; its training records."""
    run_dir = ctx.tmp / name
    _checked([sys.executable, "-m", "megatron_qwen.train", *QUIET, f"data.cache_dir={ctx.tmp / 'cache'}",
              *overrides, f"run_dir={run_dir}"], f"{name} training")
    return _records(run_dir)


def _records(run_dir: Path, name: str = "metrics.jsonl") -> List[Dict]:
    """The records of ``run_dir``'s ``metrics.jsonl`` (training) or ``eval.jsonl`` (validation)."""
    return [json.loads(line) for line in (run_dir / name).read_text().splitlines() if line.strip()]


def _finite(records: List[Dict], *keys: str) -> None:
    for record in records:
        for key in keys:
            if not math.isfinite(record[key]):
                raise AssertionError(f"step {record['step']}: {key} = {record[key]}")


def _falls(records: List[Dict], what: str, margin: float = 0.05) -> Dict:
    first, last = records[0]["loss"], records[-1]["loss"]
    if not last < first - margin:
        raise AssertionError(f"{what} loss did not fall: {first:.4f} -> {last:.4f}")
    return {"first_loss": first, "last_loss": last, "tokens_per_s": records[-1]["tokens_per_s"],
            "mfu": records[-1]["mfu"]}


def build_and_inspect(model: str) -> Dict:
    """(In a child process) builds ``model`` at TP1 and inspects its norm parameters."""
    import torch

    from megatron_qwen.config import validate
    from megatron_qwen.config.features import detect
    from megatron_qwen.config.store import compose_config
    from megatron_qwen.config.translate import to_transformer_config
    from megatron_qwen.model.build import build_model
    from megatron_qwen.model.init import Role, named_roles
    from megatron_qwen.platform.launch import detect_process_env, init_process_group
    from megatron_qwen.platform.parallel import destroy, init_model_parallel

    cfg = validate(compose_config([f"model={model}", "precision=bf16"]), 1)
    init_process_group(detect_process_env({}))
    init_model_parallel(cfg)
    try:
        with torch.no_grad():
            [chunk] = build_model(cfg.model, to_transformer_config(cfg), cfg.train.seed)  # asserts the invariants
        norms = [(name, p) for name, p, role in named_roles(chunk) if role is Role.NORM]
        return {"spec": "transformer_engine" if detect().te else "local", "te_version": detect().te_version,
                "params": sum(p.numel() for p in chunk.parameters()), "norms": len(norms),
                "fused_norms": sum(name.endswith("layer_norm_weight") for name, _ in norms),
                "norms_all_one": all(bool((p == 1).all()) for _, p in norms)}
    finally:
        destroy()


def check_init(ctx: Context, quick: bool) -> Dict:
    """Builds each model in a fresh process and reports its spec and norm invariants."""
    out = {}
    for model in ["qwen2_5_tiny"] + ([] if quick or ctx.cpu else ["qwen2_5_0_5b"]):
        out[model] = _last_json(_run([sys.executable, __file__, "--_build", model]))
        if not out[model]["norms_all_one"]:
            raise AssertionError(f"{model}: norm scales not all one: {out[model]}")
    return out


def check_train(ctx: Context) -> Dict:
    """20 bf16 pretraining steps (12 on CPU) at TP1 on mock data; the loss must fall."""
    records = _train(ctx, "train", ["model=qwen2_5_tiny", "data=mock", "precision=bf16", "train.micro_batch_size=2",
                                    "train.global_batch_size=8", *ctx.size(
                                        ["train.train_iters=20", "train.seq_length=128"],
                                        ["train.train_iters=12", "model.vocab_size=256", "train.seq_length=32"])])
    return _falls(records, "bf16")


def check_sft_packed(ctx: Context) -> Dict:
    """Packed SFT (data.extra.pack=true: several conversations per row) in bf16; the loss must fall."""
    records = _train(ctx, "sft", ["stage=sft", "data.extra.pack=true", ctx.half, "train.train_iters=8",
                                  "train.micro_batch_size=2", "train.global_batch_size=4", "optim.lr=1e-2",
                                  "optim.warmup_iters=1", *ctx.size(["train.seq_length=512"],
                                                                    ["train.seq_length=128"])])
    return _falls(records, "packed SFT", margin=0.5)


def _dpo(ctx: Context, name: str, overrides: Sequence[str]) -> List[Dict]:
    pairs = ctx.tmp / "pairs.jsonl"  # on CPU the first 40 pairs: the precompute covers every pair
    lines = (REPO / "data" / "dpo" / "example.jsonl").read_text().splitlines(keepends=True)
    pairs.write_text("".join(lines if not ctx.cpu else lines[:40]))
    records = _train(ctx, name, ["stage=dpo", f"data.blend=[{{path: '{pairs}', weight: 1.0}}]", ctx.half,
                                 "train.train_iters=3", "train.micro_batch_size=2", "train.global_batch_size=4",
                                 *ctx.size(["train.seq_length=256"], ["train.seq_length=96"]), *overrides])
    _finite(records, "loss", "rewards/accuracy", "grad_norm")
    return records


def check_dpo_precompute(ctx: Context) -> Dict:
    """stage.reference=precompute: the reference tables of the train and validation pairs are
    gathered over DP and stored, and validation reads its table; at the first step the policy is
    the reference, so the loss is ln 2."""
    records = _dpo(ctx, "dpo_precompute", ["stage.reference=precompute", "train.eval_interval=3",
                                           "train.eval_iters=1"])
    tables = sorted((ctx.tmp / "dpo_precompute" / "reference").glob("*.npy"))
    if len(tables) != 2:  # a run that validates has a validation table too
        raise AssertionError(f"{len(tables)} reference table(s) under <run_dir>/reference/, not 2 (train, validation)")
    if abs(records[0]["loss"] - math.log(2)) > 0.02:
        raise AssertionError(f"first DPO loss {records[0]['loss']:.4f} != ln 2 (policy = reference)")
    validation = _records(ctx.tmp / "dpo_precompute", "eval.jsonl")
    _finite(validation, "loss")
    return {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"], "tables": len(tables),
            "val_loss": validation[-1]["loss"]}


def check_dpo_model_sft(ctx: Context) -> Dict:
    """stage.reference=model with an SFT term: the chosen-token count is all-reduced every step."""
    records = _dpo(ctx, "dpo_model_sft", ["stage.reference=model", "stage.sft_weight=0.5"])
    if not records[0]["loss"] > math.log(2) + 0.5:  # ln 2 + 0.5 x the chosen tokens' NLL (~ln V at init)
        raise AssertionError(f"first loss {records[0]['loss']:.4f} lacks the SFT term")
    return {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"]}


def check_grpo(ctx: Context) -> Dict:
    """Two GRPO steps: rollouts, rewards, a KL reference and old log-probs (two updates per rollout)."""
    records = _train(ctx, "grpo", ["stage=grpo", ctx.half, "train.train_iters=2", "stage.group_size=4",
                                   "stage.max_new_tokens=8", "stage.updates_per_rollout=2",
                                   "train.stop_check_interval=2", "train.micro_batch_size=2",
                                   "train.global_batch_size=2", "train.seq_length=128"])
    _finite(records, "loss", "kl", "reward", "entropy")
    if "rollout_tokens_per_s" not in records[0]:
        raise AssertionError(f"step 1 sampled no rollout: {records[0]}")
    return {"rollout_tokens_per_s": records[0]["rollout_tokens_per_s"], "kl": records[-1]["kl"],
            "reward": records[-1]["reward"]}


def check_long_context(ctx: Context) -> Dict:
    """stage=long_context (RoPE base 1e6, long documents) at cp=1 in bf16."""
    records = _train(ctx, "long_context", ["stage=long_context", "parallel.cp=1", ctx.half,
                                           "train.train_iters=3", "train.micro_batch_size=1",
                                           "train.global_batch_size=2", "optim.warmup_iters=1",
                                           *ctx.size(["train.seq_length=4096"], ["train.seq_length=512"])])
    _finite(records, "loss", "grad_norm")
    return {"first_loss": records[0]["loss"], "last_loss": records[-1]["loss"],
            "tokens_per_s": records[-1]["tokens_per_s"]}


def check_resume(ctx: Context) -> Dict:
    """4 steps with a sync save at 2 (uninterrupted), against an async save that exits at 2 and
    the run resumed from it: steps 3 and 4 must give the same losses."""
    common = ["model=qwen2_5_tiny", "data=mock", "train.train_iters=4", "train.micro_batch_size=2",
              "train.global_batch_size=4", "optim.warmup_iters=1",
              ctx.half, *ctx.size(["train.seq_length=128"], ["model.vocab_size=256", "train.seq_length=32"])]
    straight = _train(ctx, "straight", [*common, "checkpoint.save_interval=2"])
    _train(ctx, "resumed", [*common, "checkpoint.save_interval=2", "checkpoint.async_save=true",
                            "train.exit_interval=2"])
    resumed = _train(ctx, "resumed", [*common, "checkpoint.save_interval=2", "checkpoint.async_save=true"])
    if [r["step"] for r in resumed] != [1, 2, 3, 4]:
        raise AssertionError(f"resumed run logged steps {[r['step'] for r in resumed]}")
    worst = max(abs(a["loss"] - b["loss"]) / abs(b["loss"]) for a, b in zip(resumed[2:], straight[2:]))
    if worst > RESUME_REL["cpu" if ctx.cpu else "cuda"]:
        raise AssertionError(f"resumed losses differ from the uninterrupted run by {worst:.2e} (relative)")
    return {"max_rel_diff": worst, "steps": [r["loss"] for r in resumed]}


def _converted(ctx: Context, vocab: int) -> tuple:
    """A random tiny HF Qwen2 model and its conversion with tools/convert.py."""
    from megatron_qwen.convert.random_hf import make_hf_model

    hf, ckpt = make_hf_model(ctx.tmp / f"hf{vocab}", tied=True, vocab=vocab), ctx.tmp / f"ckpt{vocab}"
    _checked([sys.executable, str(REPO / "tools" / "convert.py"), "hf-to-mcore", "--hf", str(hf), "--out", str(ckpt),
              "--no-progress"], "hf-to-mcore")
    return hf, ckpt


def check_generate(ctx: Context) -> Dict:
    """tools/generate.py greedy (raw prompt) = transformers' greedy ``generate`` on the same model."""
    import torch
    from transformers import AutoModelForCausalLM

    from megatron_qwen.data.tokenizer import EOD_TOKEN_ID, STOP_TOKEN_IDS, load_tokenizer

    hf, ckpt = _converted(ctx, vocab=151936)  # the real vocabulary: the bundled tokenizer's ids fit
    prompt, new = "The capital of France is", 12
    proc = _checked([sys.executable, str(REPO / "tools" / "generate.py"), "--ckpt", str(ckpt), "--raw", "--prompt",
                     prompt, "--max-new-tokens", str(new)], "generate")
    tokenizer = load_tokenizer()
    ids = torch.tensor([tokenizer.encode(prompt)])
    device = "cpu" if ctx.cpu else "cuda"
    model = AutoModelForCausalLM.from_pretrained(str(hf), dtype=torch.float32).to(device)
    out = model.generate(ids.to(device), attention_mask=torch.ones_like(ids).to(device), max_new_tokens=new,
                         do_sample=False, eos_token_id=list(STOP_TOKEN_IDS), pad_token_id=EOD_TOKEN_ID)
    completion = out[0, ids.shape[1]:].tolist()
    expected = tokenizer.decode(completion[:-1] if completion[-1] in STOP_TOKEN_IDS else completion)
    got = proc.stdout.rstrip("\n")
    if got != expected:
        raise AssertionError(f"generate.py gave {got!r}, transformers {expected!r}")
    return {"completion": got, "tokens_per_s": proc.stderr.strip().splitlines()[-1]}


def check_verify(ctx: Context) -> Dict:
    """A random tiny HF model, converted, against transformers' logits in bf16."""
    hf, ckpt = _converted(ctx, vocab=256)
    parity = _last_json(_run([sys.executable, str(REPO / "tools" / "convert.py"), "verify", "--hf", str(hf), "--ckpt",
                              str(ckpt), "--dtype", "bf16", "--tolerance", str(VERIFY_TOLERANCE)]))
    if parity["top1_agree"] < VERIFY_TOP1:
        raise AssertionError(f"bf16 top-1 agreement {parity['top1_agree']:.3f} < {VERIFY_TOP1}")
    return parity


def check_bench(ctx: Context) -> Dict:
    """tools/bench.py for 0.5B and 1.5B in bf16, ours and transformers'."""
    return {model: _last_json(_run([sys.executable, str(REPO / "tools" / "bench.py"), "--steps", "5",
                                    f"model={model}", "precision=bf16", *overrides], timeout=900))
            for model, overrides in BENCH.items()}


def parts(quick: bool) -> Dict[str, Callable[[Context], Dict]]:
    """Every part in run order (``quick``: the three of the old smoke check)."""
    table: Dict[str, Callable[[Context], Dict]] = {
        "init": lambda ctx: check_init(ctx, quick), "train": check_train, "sft_packed": check_sft_packed,
        "dpo_precompute": check_dpo_precompute, "dpo_model_sft": check_dpo_model_sft, "grpo": check_grpo,
        "long_context": check_long_context, "resume": check_resume, "generate": check_generate,
        "verify": check_verify, "bench": check_bench}
    if quick:
        return {name: table[name] for name in ("init", "train", "verify")}
    return table


def run_parts(selected: Dict[str, Callable[[Context], Dict]], ctx: Context) -> Dict:
    """Runs each part (one failure does not stop the others); the summary's ``checks`` and ``failed``."""
    summary: Dict = {"checks": {}, "failed": []}
    for name, check in selected.items():
        start = time.perf_counter()
        try:
            result = check(ctx)
        except Exception as err:  # noqa: BLE001 (every part reports; one failure fails the run)
            result = {"error": f"{type(err).__name__}: {err}"}
            summary["failed"].append(name)
        result["seconds"] = round(time.perf_counter() - start, 1)
        if not ctx.cpu and result["seconds"] > BUDGET_S.get(name, math.inf):
            result["over_budget"] = f"{result['seconds']} s > {BUDGET_S[name]} s"
        summary["checks"][name] = result
        print(f"{name}: {'FAILED' if name in summary['failed'] else 'ok'} ({result['seconds']} s)", file=sys.stderr,
              flush=True)
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="init, bf16 training and verify only")
    parser.add_argument("--parts", help=f"comma-separated subset of: {', '.join(parts(False))}")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (logic check, CI-sized, no bench)")
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        print(json.dumps(build_and_inspect(args._build)))
        return 0
    import torch

    cpu = not torch.cuda.is_available()
    if cpu and not args.allow_cpu:
        print("error: no CUDA device; run on a GPU node (or --allow-cpu for a logic check)", file=sys.stderr)
        return 2
    selected = parts(args.quick)
    if cpu:
        selected.pop("bench", None)  # timings of a CPU box mean nothing here
    if args.parts:
        unknown = set(args.parts.split(",")) - set(parts(False))
        if unknown:
            print(f"error: unknown part(s) {sorted(unknown)}; choose from {', '.join(parts(False))}", file=sys.stderr)
            return 2
        selected = {name: check for name, check in parts(False).items() if name in args.parts.split(",")}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        summary = run_parts(selected, Context(Path(tmp), cpu))
    summary = {"device": torch.cuda.get_device_name() if not cpu else "cpu", "torch": torch.__version__,
               "backend": "gloo" if cpu else "nccl", **summary, "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
