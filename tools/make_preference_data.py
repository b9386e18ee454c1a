"""Write the synthetic arithmetic task (sum of two small numbers) as JSONL.

    python tools/make_preference_data.py --out data/dpo/example.jsonl [--pairs 256] [--seed 0]
        [--max-operand 9] [--system TEXT] [--plain-every K] [--sft]

Preference pairs by default (chosen = the correct sum, rejected = a near miss), SFT
conversations with the correct sum with ``--sft``. Same arguments, same file. The shipped
``data/dpo/example.jsonl`` is ``--pairs 256 --seed 0 --plain-every 4``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a checkout without installing

from megatron_qwen.data.arithmetic import preference_pairs, sft_conversations  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    p.add_argument("--pairs", type=int, default=256, help="number of records")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-operand", type=int, default=9, help="operands are drawn from 0..N")
    p.add_argument("--system", default=None, help="system message of every prompt (default: none)")
    p.add_argument("--plain-every", type=int, default=0, help="every K-th pair in trl's plain-string form")
    p.add_argument("--sft", action="store_true", help="SFT conversations instead of preference pairs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Writes the file (under a temporary name, renamed when complete); returns the exit code."""
    args = parse_args(argv)
    if args.pairs < 1 or args.max_operand < 1 or args.plain_every < 0:
        print("error: --pairs and --max-operand must be >= 1 and --plain-every >= 0", file=sys.stderr)
        return 2
    if args.sft:
        records = sft_conversations(args.pairs, args.seed, args.max_operand, args.system)
    else:
        records = preference_pairs(args.pairs, args.seed, args.max_operand, args.system, args.plain_every)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_name(f"{args.out.name}.tmp{os.getpid()}")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    os.replace(tmp, args.out)
    print(f"wrote {len(records)} {'conversations' if args.sft else 'pairs'} to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
