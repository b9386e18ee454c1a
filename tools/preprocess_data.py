"""Tokenize JSONL / JSONL.gz / Parquet into a megatron-core indexed dataset.

    python tools/preprocess_data.py --input FILE [FILE ...] --output-prefix PREFIX \\
        [--json-key text] [--tokenizer DIR] [--workers N] [--skip-bad-lines] [--split-chars N]
        [--chat | --preference]

Writes PREFIX.bin and PREFIX.idx (one document per record, EOD appended); with --chat,
also PREFIX_loss_mask.bin/.idx; with --preference (records {"prompt", "chosen", "rejected"}),
one document of two sequences (chosen, rejected) per pair and PREFIX_loss_mask.bin/.idx.
See megatron_qwen.data.preprocess for the rules.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing
# NOTE: importing megatron-core warns about optional kernels (apex, Transformer Engine) that
# tokenizing never uses; those lines would bury the one-line error this CLI promises.
warnings.filterwarnings("ignore", module=r"megatron\.")

from megatron_qwen.data.preprocess import PreprocessOptions, preprocess  # noqa: E402
from megatron_qwen.cli import ArgumentParser  # noqa: E402
from megatron_qwen.errors import UserError  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    p = ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, help="JSONL, JSONL.gz or Parquet files")
    p.add_argument("--output-prefix", required=True, help="writes PREFIX.bin and PREFIX.idx")
    p.add_argument("--json-key", default=None, help="field holding the text (default text; messages with --chat)")
    p.add_argument("--tokenizer", default=None, help="HF tokenizer dir (default: the Qwen2.5 tokenizer)")
    p.add_argument("--workers", type=int, default=1, help="tokenizer processes")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip and count bad records instead of failing")
    p.add_argument("--split-chars", type=int, default=0,
                   help="split documents longer than this at blank lines, each piece its own document (0 = off)")
    kind = p.add_mutually_exclusive_group()
    kind.add_argument("--chat", action="store_true", help="records are SFT conversations; also writes PREFIX_loss_mask")
    kind.add_argument("--preference", action="store_true",
                      help="records are preference pairs (prompt, chosen, rejected); also writes PREFIX_loss_mask")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Runs the conversion; returns the exit code (2 on bad input, with one ``error:`` line)."""
    args = parse_args(argv)
    if args.workers < 1:
        print(f"error: --workers {args.workers} must be >= 1", file=sys.stderr)
        return 2
    if args.preference and args.json_key:
        print("error: --json-key does not apply to --preference (a record is the whole object with prompt, "
              "chosen and rejected); drop --json-key", file=sys.stderr)
        return 2
    options = PreprocessOptions(json_key=args.json_key, tokenizer=args.tokenizer, workers=args.workers,
                                skip_bad_lines=args.skip_bad_lines, split_chars=args.split_chars,
                                chat=args.chat, preference=args.preference, progress=not args.quiet)
    try:
        stats = preprocess(args.input, args.output_prefix, options)
    except UserError as err:  # bad input or tokenizer
        print(f"error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # input errors are InputError; this is the output side
        print(f"error: cannot write {args.output_prefix}.bin/.idx ({err}); choose a writable --output-prefix",
              file=sys.stderr)
        return 2
    for example in stats.bad_examples:
        print(f"skipped: {example}", file=sys.stderr)
    print(f"{args.output_prefix}: {stats.summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
