"""Sample a completion from a checkpoint: the quick sanity check of any checkpoint.

    python tools/generate.py --ckpt DIR --prompt "What is 2 + 3?" [--system TEXT] [--raw]
        [--max-new-tokens 64] [--temperature 0] [--top-p 1.0] [--seed 0] [--tp N] [--tokenizer DIR]
        [--num-samples N] [--no-kv-cache]

DIR is a converted checkpoint (``tools/convert.py hf-to-mcore``), an ``iter_XXXXXXX``
directory or a run's ``checkpoints/`` directory (its latest checkpoint). The tokenizer is the one
the checkpoint was converted or trained with, as ``tools/convert.py mcore-to-hf`` exports it
(--tokenizer overrides it). The prompt becomes a user turn of the Qwen2.5 chat template (after the
default system prompt, or --system) unless --raw; the completion is printed without its closing
``<|im_end|>``, and the token count and tokens/s of the generation (loading excluded) go to stderr.
``--temperature 0`` (the default) is greedy decoding. ``--num-samples N`` samples N completions of
the prompt in one batch (a GRPO group; each printed after a ``=== sample i ===`` line);
``--no-kv-cache`` recomputes the whole sequence at every step (docs/benchmarks.md compares the two).

``--tp N`` spawns N local ranks (gloo on CPU); under ``torchrun --nproc-per-node N`` (or srun)
the launched ranks are used instead and rank 0 prints. Bad input ends with one
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
    parser.add_argument("--prompt", required=True, help="the user message (or the raw text with --raw)")
    parser.add_argument("--system", help="system message (default: Qwen2.5's default system prompt)")
    parser.add_argument("--raw", action="store_true", help="tokenize --prompt as is, without the chat template")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to load the checkpoint on")
    parser.add_argument("--tokenizer", help="HF tokenizer dir (default: the checkpoint's own, else its run's "
                        "data.tokenizer, else the Qwen2.5 tokenizer)")
    parser.add_argument("--num-samples", type=int, default=1, help="completions of the prompt, sampled as one batch")
    parser.add_argument("--no-kv-cache", action="store_true", help="recompute the sequence at every step")
    return parser


def _prompt_text(args: argparse.Namespace) -> str:
    from megatron_qwen.data.prompts import render_prompt

    if args.raw:
        return args.prompt
    messages = [{"role": "system", "content": args.system}] if args.system is not None else []
    return render_prompt(messages + [{"role": "user", "content": args.prompt}])


def _print(rollouts, tokenizer) -> None:
    for i, (completion, stopped) in enumerate(zip(rollouts.completion_ids, rollouts.stopped)):
        if len(rollouts.completion_ids) > 1:
            print(f"=== sample {i} ===")
        print(tokenizer.decode(completion[:-1] if stopped else completion))
    print(f"{rollouts.num_completion_tokens} tokens ({sum(rollouts.stopped)} of {len(rollouts.stopped)} stopped) "
          f"in {rollouts.seconds:.2f} s: {rollouts.tokens_per_second:.1f} tokens/s", file=sys.stderr)


def _run(args: argparse.Namespace) -> int:
    from megatron_qwen.data.tokenizer import TokenizerError, load_tokenizer
    from megatron_qwen.generation.engine import SamplingParams

    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed, use_kv_cache=not args.no_kv_cache)
    params.check()  # before the slow imports below
    if args.num_samples < 1:
        raise UserError(f"--num-samples {args.num_samples} must be >= 1")
    from megatron_qwen.convert.run_files import checkpoint_tokenizer, resolve_checkpoint
    from megatron_qwen.generation.checkpoint import generate_from_checkpoint
    from megatron_qwen.platform.launch import detect_process_env

    directory = args.tokenizer or checkpoint_tokenizer(resolve_checkpoint(args.ckpt))
    try:
        tokenizer = load_tokenizer(None if directory is None else str(directory))
    except TokenizerError as err:
        raise UserError(str(err)) from err
    prompts = [tokenizer.encode(_prompt_text(args))] * args.num_samples
    [rollouts] = generate_from_checkpoint(args.ckpt, prompts, [params], args.tp)
    if detect_process_env().rank == 0:
        _print(rollouts, tokenizer)
    return 0


def main(argv=None) -> int:
    """Parses arguments, generates, prints; returns the exit code."""
    # NOTE: megatron-core and torch.distributed.checkpoint warn about optional kernels on
    # import and load; none of it concerns generation, and it would bury the one-line error.
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
