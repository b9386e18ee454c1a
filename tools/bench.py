"""Benchmark a training step: tokens/s, TFLOP/s per device, MFU and peak memory.

    python tools/bench.py [--steps 10] [--no-hf] [hydra overrides ...]
    torchrun --nproc-per-node 2 tools/bench.py parallel.tp=2 ...
    python tools/bench.py --profile [--profile-ops 15] --steps 3 stage=grpo checkpoint.load=DIR ...
    python tools/bench.py --saves 3 --steps 4 [--code ../base] [checkpoint.async_save=true] ...

Our numbers come from the real trainer (``python -m megatron_qwen.train`` with mock
data). On a single process it also times transformers' Qwen2ForCausalLM + torch AdamW on
the identical config and batch and prints the ratio ours / HF. The last line is JSON.

``--profile`` keeps the data and ``checkpoint.load`` of the overrides (a GRPO run needs its
prompts and a starting checkpoint) and, over the timed steps, charges wall-clock and process
CPU seconds to the phases of a step (:data:`PHASES`: rollout sampling, reward scoring, the
reference and old log-prob passes, the policy forward with its loss, backward, optimizer step);
``--profile-ops N`` adds torch.profiler's N most expensive operators (self CPU time, by input
shape) over the same steps. One process, PP = 1 (megatron's no-pipelining schedule).

``--saves N`` saves a checkpoint every ``--steps`` steps, N times, and reports what the
training loop waits per save (wall seconds inside the checkpoint saver's calls, see
``benchmark.SaveClock``), sync or async as the overrides say, and the checkpoint's size.
``--code DIR`` measures another checkout's ``megatron_qwen`` (e.g. the code before a change)
with this harness.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union



def _code_root() -> Path:
    """The checkout whose package is measured: ``--code DIR`` (read before the imports below) or this one."""
    argv = sys.argv[1:]
    code = argv[argv.index("--code") + 1] if "--code" in argv else Path(__file__).parent.parent
    return Path(code).resolve()


sys.path.insert(0, str(_code_root()))

from megatron_qwen.config import validate  # noqa: E402
from megatron_qwen.config.store import compose_config  # noqa: E402
from megatron_qwen.platform.launch import detect_process_env  # noqa: E402
from megatron_qwen.training.metrics import format_mfu  # noqa: E402

KEYS = ("tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gb")
GRPO = "megatron_qwen.training.stages.grpo.stage"
# --profile: (phase, "module:attribute" wrapped for the run). A call is charged to the outermost
# phase running, so the forwards of a log-prob pass count as that pass, not as the policy forward.
PHASES = (
    ("rollout sampling", f"{GRPO}:sample_groups"),
    ("reward scoring", f"{GRPO}:reward_fields"),
    (lambda args: f"{args[3]} pass", f"{GRPO}:GRPOStage._attach_logps"),  # key: ref_logps | old_logps
    ("policy forward + loss", "megatron.core.pipeline_parallel.schedules:forward_step"),
    ("policy backward", "megatron.core.pipeline_parallel.schedules:backward_step"),
    ("optimizer step", "megatron_qwen.training.step:optimizer_step"),  # also counts the steps
)


class PhaseClock:
    """Wall and process CPU seconds per phase over the optimizer steps after ``warmup`` of them."""

    def __init__(self, warmup: int, profile_ops: int) -> None:
        self.warmup, self.steps, self.running = warmup, 0, False
        self.wall: Dict[str, float] = defaultdict(float)
        self.cpu: Dict[str, float] = defaultdict(float)
        self.start: Optional[Tuple[float, float]] = None  # (wall, cpu) after the last warm-up step
        self.end: Tuple[float, float] = (0.0, 0.0)
        self.profiler = torch_profiler() if profile_ops else None

    def install(self) -> None:
        for label, target in PHASES:
            module, _, path = target.partition(":")
            *owner_path, name = path.split(".")
            owner = functools.reduce(getattr, owner_path, importlib.import_module(module))
            setattr(owner, name, self._wrap(getattr(owner, name), label, name == "optimizer_step"))

    def _wrap(self, fn: Callable, label: Union[str, Callable], counts_steps: bool) -> Callable:
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.running:  # inside another phase: charged to that one
                return fn(*args, **kwargs)
            self.running, since = True, _now()
            try:
                return fn(*args, **kwargs)
            finally:
                self.running, now = False, _now()
                if self.start is not None:
                    name = label(args) if callable(label) else label
                    self.wall[name] += now[0] - since[0]
                    self.cpu[name] += now[1] - since[1]
                if counts_steps:
                    self._step_done(now)
        return timed

    def _step_done(self, now: Tuple[float, float]) -> None:
        self.steps += 1
        self.end = now
        if self.steps == self.warmup:
            self.start = now
            if self.profiler is not None:
                self.profiler.start()

    def report(self) -> Dict[str, Dict[str, float]]:
        """Seconds per timed step of each phase and of the rest ("other"), and the whole step."""
        if self.profiler is not None:
            self.profiler.stop()
        steps = self.steps - self.warmup
        rows = {name: {"wall_s": self.wall[name] / steps, "cpu_s": self.cpu[name] / steps} for name in self.wall}
        total = {"wall_s": (self.end[0] - self.start[0]) / steps, "cpu_s": (self.end[1] - self.start[1]) / steps}
        rows["other"] = {key: total[key] - sum(r[key] for r in rows.values()) for key in total}
        rows["step"] = total
        return rows


def torch_profiler():
    """A CPU operator profiler recording input shapes (output layer vs. layers, by shape)."""
    import torch

    return torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True)


def _now() -> Tuple[float, float]:
    return time.perf_counter(), time.process_time()


def profile_config(cfg, composed):
    """--profile: the benchmark config with the overrides' data, starting checkpoint and no validation."""
    return dataclasses.replace(cfg, data=composed.data,
                               checkpoint=dataclasses.replace(cfg.checkpoint, load=composed.checkpoint.load),
                               train=dataclasses.replace(cfg.train, eval_at_start=False))


def print_profile(clock: PhaseClock, ops: int) -> Dict[str, Dict[str, float]]:
    """Prints the phase table (and the operator table) of the timed steps; returns the phases."""
    rows = clock.report()
    step_cpu = rows["step"]["cpu_s"]
    print(f"{'phase':<24} {'wall s/step':>11} {'CPU s/step':>10} {'CPU share':>9}")
    for name, row in rows.items():
        print(f"{name:<24} {row['wall_s']:11.3f} {row['cpu_s']:10.3f} {row['cpu_s'] / step_cpu:9.1%}")
    if clock.profiler is not None:
        print(clock.profiler.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total",
                                                                          row_limit=ops, max_name_column_width=40))
    return rows


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10, help="timed steps (after as many warm-up steps)")
    parser.add_argument("--no-hf", action="store_true", help="skip the transformers baseline")
    parser.add_argument("--profile", action="store_true",
                        help="time the phases of a step (keeps the data and checkpoint.load of the overrides)")
    parser.add_argument("--profile-ops", type=int, default=0, metavar="N",
                        help="with --profile: also the N most expensive operators (torch.profiler)")
    parser.add_argument("--saves", type=int, default=0, metavar="N",
                        help="checkpoint mode: N saves, one every --steps steps; the loop's wait per save")
    parser.add_argument("--code", type=Path, metavar="DIR", help="measure the megatron_qwen of this checkout")
    parser.add_argument("overrides", nargs="*", help="hydra overrides, e.g. model=qwen2_5_0_5b precision=bf16")
    return parser.parse_args()


def bench_saves(args: argparse.Namespace, world_size: int) -> None:
    """--saves: the loop's wait per checkpoint save (printed, and as JSON on the last line)."""
    from megatron_qwen.train import run
    from benchmark import SaveClock, save_config

    clock = SaveClock()
    clock.install()
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        cfg = save_config(compose_config(args.overrides), args.steps, args.saves, Path(tmp))
        validate(cfg, world_size)
        start = time.perf_counter()
        run(cfg)
        seconds = time.perf_counter() - start
        newest = max((Path(tmp) / "checkpoints").glob("iter_*"))
        size = sum(p.stat().st_size for p in newest.rglob("*") if p.is_file())
    result = {"code": str(_code_root()), "model": cfg.model.name, "async_save": cfg.checkpoint.async_save,
              "checkpoint_gb": size / 1e9, "run_s": seconds, **clock.report()}
    print(f"{'async' if cfg.checkpoint.async_save else 'sync'} save of {size / 1e9:.2f} GB: the loop waits "
          f"{result['wait_per_save_s']:.2f} s per save ({result['in_save_call_s']:.2f} s in the save call, "
          f"{result['after_save_call_s']:.2f} s after it); published {result['published_after_s']:.2f} s after "
          "the call")
    print(json.dumps(result))


def main() -> None:
    args = _parse()
    penv = detect_process_env()
    if args.saves:
        return bench_saves(args, penv.world_size)
    from megatron_qwen.train import run
    from benchmark import bench_config, bench_hf  # tools/benchmark.py (this script's folder is on sys.path)

    clock = None
    with tempfile.TemporaryDirectory(prefix="bench_") as tmp:
        composed = compose_config(args.overrides)
        cfg = bench_config(composed, args.steps, Path(tmp))
        if args.profile:
            cfg, clock = profile_config(cfg, composed), PhaseClock(args.steps, args.profile_ops)
            clock.install()
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
    if clock is not None:
        result["phases"] = print_profile(clock, args.profile_ops)
        result["ours"].update({k: v for k, v in ours.items() if k.endswith("_tokens_per_s")})
    elif penv.world_size == 1 and not args.no_hf:
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
