"""GPU acceptance check: the production path on one CUDA device, in a few minutes.

    python tools/gpu_check.py              # on a GPU node (about 5 minutes on one H100)
    python tools/gpu_check.py --quick      # init + bf16 training + bf16 verify only
    python tools/gpu_check.py --allow-cpu --quick   # the same logic on a CPU box (CI smoke)

Runs, each in its own process, with whichever layer spec imports (Transformer Engine when
it does, else the local spec with PyTorch SDPA):

1. ``init``: builds the tiny and the Qwen2.5-0.5B model and checks the initialization
   invariants (every norm scale exactly one, two per layer, also TE's fused
   ``layer_norm_weight``) and the parameter count;
2. ``train``: 20 bf16 steps at TP1 on mock data; the loss must fall;
3. ``verify``: a random tiny HF Qwen2 model converted with ``tools/convert.py`` gives
   transformers' logits in bf16 within ``VERIFY_TOLERANCE``;
4. ``bench``: ``tools/bench.py`` for Qwen2.5-0.5B and 1.5B in bf16 with the transformers
   baseline (skipped by ``--quick``).

The last stdout line is one JSON object with every number; the exit code is 0 only if
every check passed. CI does not run this (it has no GPU); it runs ``--allow-cpu --quick``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VERIFY_TOLERANCE = 0.05  # max |logit| difference in bf16 (CPU measures ~0.01 on the tiny model)
VERIFY_TOP1 = 0.95  # fraction of positions whose argmax agrees
TRAIN = ["model=qwen2_5_tiny", "data=mock", "precision=bf16", "train.train_iters=20", "train.seq_length=128",
         "train.micro_batch_size=2", "train.global_batch_size=8", "train.eval_interval=0", "logging.log_interval=1",
         "checkpoint.save_interval=null", "checkpoint.save_at_end=false", "logging.wandb_mode=disabled",
         "logging.tensorboard=false", "logging.progress_bar=false"]
CPU_TRAIN = ["model.vocab_size=256", "train.seq_length=32"]  # --allow-cpu: the same logic, CI-sized
BENCH = {  # model -> overrides: sequence 4096 as the published anchors (docs/benchmarks.md)
    "qwen2_5_0_5b": ["train.seq_length=4096", "train.micro_batch_size=2", "train.global_batch_size=8"],
    "qwen2_5_1_5b": ["train.seq_length=4096", "train.micro_batch_size=1", "train.global_batch_size=4"],
}


def _run(cmd: List[str], timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _last_json(proc: subprocess.CompletedProcess) -> Dict:
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(proc.args[:4])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_init(models: List[str]) -> Dict:
    """Builds each model in a fresh process and reports its spec and norm invariants."""
    out = {}
    for model in models:
        out[model] = _last_json(_run([sys.executable, __file__, "--_build", model]))
        if not out[model]["norms_all_one"]:
            raise AssertionError(f"{model}: norm scales not all one: {out[model]}")
    return out


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


def check_train(run_dir: Path, cpu: bool) -> Dict:
    """20 bf16 steps at TP1; the loss must fall."""
    proc = _run([sys.executable, "-m", "megatron_qwen.train", *TRAIN, *(CPU_TRAIN if cpu else []),
                 f"run_dir={run_dir}"])
    if proc.returncode != 0:
        raise RuntimeError(f"training exited {proc.returncode}: {proc.stderr[-2000:]}")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    first, last = records[0]["loss"], records[-1]["loss"]
    if not last < first - 0.05:
        raise AssertionError(f"bf16 loss did not fall: {first:.4f} -> {last:.4f}")
    return {"first_loss": first, "last_loss": last, "tokens_per_s": records[-1]["tokens_per_s"],
            "mfu": records[-1]["mfu"]}


def check_verify(tmp: Path) -> Dict:
    """A random tiny HF model, converted, against transformers' logits in bf16."""
    from megatron_qwen.convert.random_hf import make_hf_model

    hf, ckpt = make_hf_model(tmp / "hf", tied=True), tmp / "ckpt"
    convert = [sys.executable, str(REPO / "tools" / "convert.py")]
    proc = _run(convert + ["hf-to-mcore", "--hf", str(hf), "--out", str(ckpt), "--no-progress"])
    if proc.returncode != 0:
        raise RuntimeError(f"hf-to-mcore exited {proc.returncode}: {proc.stderr[-2000:]}")
    parity = _last_json(_run(convert + ["verify", "--hf", str(hf), "--ckpt", str(ckpt), "--dtype", "bf16",
                                        "--tolerance", str(VERIFY_TOLERANCE)]))
    if parity["top1_agree"] < VERIFY_TOP1:
        raise AssertionError(f"bf16 top-1 agreement {parity['top1_agree']:.3f} < {VERIFY_TOP1}")
    return parity


def check_bench() -> Dict:
    """tools/bench.py for 0.5B and 1.5B in bf16, ours and transformers'."""
    return {model: _last_json(_run([sys.executable, str(REPO / "tools" / "bench.py"), "--steps", "5",
                                    f"model={model}", "precision=bf16", *overrides], timeout=900))
            for model, overrides in BENCH.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny model only, no benchmarks")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (logic smoke test)")
    parser.add_argument("--_build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._build:
        print(json.dumps(build_and_inspect(args._build)))
        return 0
    import torch

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("error: no CUDA device; run on a GPU node (or --allow-cpu for a logic smoke test)", file=sys.stderr)
        return 2
    summary: Dict = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                     "torch": torch.__version__, "checks": {}, "failed": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        checks = {"init": lambda: check_init(["qwen2_5_tiny"] + ([] if args.quick else ["qwen2_5_0_5b"])),
                  "train": lambda: check_train(Path(tmp) / "train", not torch.cuda.is_available()),
                  "verify": lambda: check_verify(Path(tmp))}
        if not args.quick:
            checks["bench"] = check_bench
        for name, check in checks.items():
            try:
                summary["checks"][name] = check()
            except Exception as err:  # noqa: BLE001 (every check reports; one failure fails the run)
                summary["checks"][name] = {"error": f"{type(err).__name__}: {err}"}
                summary["failed"].append(name)
            print(f"{name}: {'FAILED' if name in summary['failed'] else 'ok'}", file=sys.stderr, flush=True)
    summary["seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(summary))
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
