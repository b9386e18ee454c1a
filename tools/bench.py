"""Benchmark a training step: tokens/s, TFLOP/s per device, MFU and peak memory.

    python tools/bench.py [--steps 10] [--no-hf] [hydra overrides ...]
    torchrun --nproc-per-node 2 tools/bench.py parallel.tp=2 ...

Our numbers come from the real trainer (``python -m megatron_qwen.train`` with mock
data). On a single process it also times transformers' Qwen2ForCausalLM + torch AdamW on
the identical config and batch and prints the ratio ours / HF. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.config import validate  # noqa: E402
from megatron_qwen.config.store import compose_config  # noqa: E402
from megatron_qwen.platform.launch import detect_process_env  # noqa: E402
from megatron_qwen.training.metrics import format_mfu  # noqa: E402

KEYS = ("tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gb")


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up steps)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=qwen2_5_0_5b precision=bf16")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    penv = detect_process_env()
    from megatron_qwen.train import run
    from megatron_qwen.training.benchmark import bench_config, bench_hf

    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        cfg = bench_config(compose_config(args.overrides), args.steps, Path(tmp))
        validate(cfg, penv.world_size)
        run(cfg)
        ours = None
        if (Path(tmp) / "metrics.jsonl").exists():  # written on the last rank only
            ours = json.loads((Path(tmp) / "metrics.jsonl").read_text().splitlines()[-1])
    if ours is None:
        return
    result = {"model": cfg.model.name, "world_size": penv.world_size, "dtype": cfg.precision.dtype,
              "seq_length": cfg.train.seq_length, "global_batch_size": cfg.train.global_batch_size,
              "ours": {k: ours[k] for k in KEYS}}
    if penv.world_size == 1 and not args.no_hf:
        result["hf"] = bench_hf(cfg, args.steps)
        result["ratio_tokens_per_s"] = result["ours"]["tokens_per_s"] / result["hf"]["tokens_per_s"]
    for side in ("ours", "hf"):
        if side in result:
            r = result[side]
            print(f"{side:>4}: {r['tokens_per_s']:10.1f} tok/s | {r['tflops_per_device']:.3f} TFLOP/s/dev | "
                  f"MFU {format_mfu(r['mfu'])} | peak mem {r['peak_mem_gb']:.2f} GB")
    if "ratio_tokens_per_s" in result:
        print(f"ours / HF tokens/s: {result['ratio_tokens_per_s']:.2f}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
