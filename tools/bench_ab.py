"""Side by side: ``tools/bench.py --profile`` of this checkout and of another (the code before a
change, e.g. ``git worktree add ../base <commit>``), interleaved in one run on one machine.

    python tools/bench_ab.py --base ../base --rounds 2 --steps 3 \\
        --setting A "train.seq_length=40 stage.group_size=4" --setting B "..." -- COMMON OVERRIDES
    python tools/bench_ab.py --base ../base --saves 3 --steps 3 --setting sync "checkpoint.async_save=false" \\
        --setting async "checkpoint.async_save=true" -- COMMON OVERRIDES

Every round runs each setting on both sides, one fresh process each, the side that goes first
alternating from round to round, so a shared machine's load falls on both alike. Each process
imports its own checkout (``PYTHONPATH`` and working directory). Per setting it prints the
median over rounds of optimizer steps per second (1 / wall and 1 / process CPU seconds per timed
step) and rollout tokens per second (the stage's ``rollout_tokens_per_s``, wall clock, and the
same tokens over the sampling phase's CPU seconds), each side and the ratio this / base. The
last line is JSON.

With ``--saves N`` each process is ``tools/bench.py --saves N`` of this checkout measuring the
side's package (``--code``; the code before a change may not have the mode), and the numbers are
the training loop's wait per checkpoint save and the seconds until the checkpoint is published.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent.parent
ENV = {"OMP_NUM_THREADS": "1", "THP_MEM_ALLOC_ENABLE": "1"}  # docs/benchmarks.md "GRPO step"


SAVE_KEYS = ("wait_per_save_s", "in_save_call_s", "of_which_previous_save_s", "after_save_call_s", "published_after_s",
             "checkpoint_gb")


def bench_once(checkout: Path, steps: int, overrides: List[str], saves: int = 0) -> Dict[str, float]:
    """One ``tools/bench.py`` process measuring ``checkout``: its per-step rates (``--profile``),
    or with ``saves`` its waits per checkpoint save."""
    if saves:
        cmd = [sys.executable, str(HERE / "tools/bench.py"), "--saves", str(saves), "--steps", str(steps),
               "--code", str(checkout), *overrides]
    else:
        cmd = [sys.executable, "tools/bench.py", "--profile", "--steps", str(steps), *overrides]
    env = {**os.environ, **ENV, "PYTHONPATH": str(checkout)}
    proc = subprocess.run(cmd, cwd=checkout, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"error: {' '.join(cmd)} in {checkout} exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if saves:
        return {key: result[key] for key in SAVE_KEYS}
    phases, rate = result["phases"], result["ours"].get("rollout_tokens_per_s", 0.0)
    sampling = phases.get("rollout sampling", {"wall_s": 0.0, "cpu_s": 0.0})
    tokens = rate * sampling["wall_s"]  # completion tokens per step
    return {"steps_per_s": 1 / phases["step"]["wall_s"], "steps_per_cpu_s": 1 / phases["step"]["cpu_s"],
            "rollout_tokens_per_s": rate,
            "rollout_tokens_per_cpu_s": tokens / sampling["cpu_s"] if sampling["cpu_s"] else 0.0}


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", type=Path, required=True, help="the other checkout (the code before)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (after as many warm-up steps)")
    parser.add_argument("--saves", type=int, default=0, metavar="N",
                        help="compare the loop's wait per checkpoint save (N saves, every --steps steps)")
    parser.add_argument("--setting", nargs=2, action="append", metavar=("NAME", "OVERRIDES"), required=True,
                        help="a setting's own hydra overrides, one shell-quoted string")
    parser.add_argument("common", nargs="*", help="hydra overrides of every setting (after --)")
    return parser.parse_args()


def main() -> None:
    args = _parse()
    sides = {"base": args.base.resolve(), "this": HERE}
    runs: Dict[str, Dict[str, List[Dict[str, float]]]] = {name: {"base": [], "this": []} for name, _ in args.setting}
    for round_ in range(args.rounds):
        order = ["base", "this"] if round_ % 2 == 0 else ["this", "base"]
        for name, own in args.setting:
            for side in order:
                runs[name][side].append(bench_once(sides[side], args.steps, [*args.common, *shlex.split(own)],
                                                   args.saves))
                print(f"round {round_ + 1} {name} {side}: {runs[name][side][-1]}", flush=True)
    summary = {}
    for name, by_side in runs.items():
        medians = {side: {key: statistics.median(r[key] for r in rows) for key in rows[0]}
                   for side, rows in by_side.items()}
        ratio = {key: medians["this"][key] / medians["base"][key] if medians["base"][key] else None
                 for key in medians["this"]}
        summary[name] = {**medians, "ratio": ratio}
        print(f"{name}: " + ", ".join(f"{key} {medians['base'][key]:.3f} -> {medians['this'][key]:.3f}"
                                      + (f" (x{ratio[key]:.2f})" if ratio[key] is not None else "")
                                      for key in medians["this"]))
    print(json.dumps({"rounds": args.rounds, "steps": args.steps, "saves": args.saves, "settings": summary}))


if __name__ == "__main__":
    main()
