"""Evaluate a checkpoint with EleutherAI's lm-evaluation-harness, in place, at any TP/PP layout.

    python tools/evaluate.py --ckpt DIR --tasks a,b [--tp N] [--pp M] [--limit K] [--num-fewshot F]
        [--batch-size B] [--max-length L] [--dtype fp32|bf16] [--bootstrap-iters N] [--log-samples]
        [--tokenizer DIR] [--output results.json]

DIR is a converted checkpoint (``tools/convert.py hf-to-mcore``), an ``iter_XXXXXXX`` directory
or a run's ``checkpoints/`` directory (its latest checkpoint). Tasks are lm-eval task names: the
ones shipped in megatron_qwen/evaluation/tasks/ (arith_choice, arith_gen, prose_ppl: local JSONL,
nothing downloaded), or any task of lm-eval's registry where the machine can download its data
(``HF_DATASETS_OFFLINE=0 HF_HUB_OFFLINE=0``; offline is the default here). lm-eval's results
table is printed and its JSON written to --output.

``--tp N --pp M`` spawns N*M local ranks (gloo on CPU); under ``torchrun --nproc-per-node N*M``
(or srun) the launched ranks are used instead and rank 0 prints. Bad input ends with one
``error: ...`` line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron_qwen.errors import UserError  # noqa: E402


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, required=True, help="checkpoint directory (see above)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval task names")
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks")
    parser.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks")
    parser.add_argument("--limit", type=float, help="documents per task (a fraction of them when < 1)")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's own)")
    parser.add_argument("--batch-size", type=int, default=8, help="rows per forward pass")
    parser.add_argument("--max-length", type=int, help="longest scored row (default: max_position_embeddings)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="compute precision")
    parser.add_argument("--bootstrap-iters", type=int, default=100000, help="0 skips bootstrapped stderrs")
    parser.add_argument("--log-samples", action="store_true", help="per-request responses in the JSON")
    parser.add_argument("--tokenizer", help="HF tokenizer dir (default: the checkpoint's, else Qwen2.5's)")
    parser.add_argument("--output", type=Path, help="write lm-eval's results JSON here")
    return parser


def _check(args: argparse.Namespace, tasks) -> None:
    for name in ("tp", "pp", "batch_size"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} {getattr(args, name)} must be >= 1")
    if args.limit is not None and args.limit <= 0:
        raise UserError(f"--limit {args.limit} must be > 0")
    if args.output is not None and not args.output.parent.is_dir():
        raise UserError(f"--output {args.output}: directory {args.output.parent} does not exist; create it first")
    from megatron_qwen.evaluation.registry import check_task_names

    check_task_names(tasks)


def _run(args: argparse.Namespace) -> int:
    from megatron_qwen.evaluation.run import EvalOptions, evaluate_checkpoint, results_json
    from megatron_qwen.platform.launch import detect_process_env

    tasks = [name.strip() for name in args.tasks.split(",") if name.strip()]
    _check(args, tasks)
    limit = int(args.limit) if args.limit is not None and args.limit >= 1 else args.limit
    options = EvalOptions(tasks, limit, args.num_fewshot, args.batch_size, args.max_length, args.bootstrap_iters,
                          args.log_samples)
    results = evaluate_checkpoint(args.ckpt, options, args.tp, args.pp, args.tokenizer, args.dtype)
    if detect_process_env().rank == 0:
        from lm_eval.utils import make_table

        print(make_table(results))
        if args.output is not None:
            tmp = args.output.with_name(args.output.name + ".tmp")  # no partial file on a crash
            tmp.write_text(results_json(results))
            os.replace(tmp, args.output)
    return 0


def main(argv=None) -> int:
    """Parses arguments, evaluates, prints; returns the exit code."""
    # NOTE: megatron-core and torch.distributed.checkpoint warn about optional kernels on
    # import and load; none of it concerns evaluation, and it would bury the one-line error.
    warnings.filterwarnings("ignore", module=r"(megatron|torch)\.")
    os.environ.setdefault("PYTHONWARNINGS", "ignore::UserWarning,ignore::FutureWarning")  # spawned ranks
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
