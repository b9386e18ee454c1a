"""Hugging Face Qwen2.5 / Qwen2-MoE <-> Megatron checkpoints (thin CLI over megatron_qwen.convert).

    python tools/convert.py hf-to-mcore --hf DIR --out CKPT_DIR
    python tools/convert.py mcore-to-hf --ckpt CKPT_DIR --out HF_DIR [--dtype bf16|fp16|fp32]
                                        [--shard-size 5GB] [--tokenizer DIR]
                                        [--rope-scaling yarn --rope-factor 4
                                         --original-max-position-embeddings 32768]
    python tools/convert.py verify --hf DIR --ckpt CKPT_DIR [--tp N] [--pp N] [--ep N] [--cp N]
                                   [--tolerance X] [--seq-len N] [--dtype fp32|bf16]

Bad input ends with one ``error: ...`` line on stderr and exit code 2; ``verify`` exits 1
when the logits differ by more than the tolerance. Its last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from megatron_qwen.cli import ArgumentParser  # noqa: E402
from megatron_qwen.errors import UserError  # noqa: E402


def _parser() -> ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> megatron checkpoint (loadable at any layout)")
    to_mcore.add_argument("--hf", type=Path, required=True)
    to_mcore.add_argument("--out", type=Path, required=True)
    to_hf = sub.add_parser("mcore-to-hf", help="megatron checkpoint (any layout) -> HF directory")
    to_hf.add_argument("--ckpt", type=Path, required=True,
                       help="iter_XXXXXXX dir, a run's checkpoints/ dir (latest) or a converted checkpoint")
    to_hf.add_argument("--out", type=Path, required=True)
    to_hf.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), help="default: the checkpoint's dtype")
    to_hf.add_argument("--shard-size", default="5GB", help="max safetensors shard size (default 5GB)")
    to_hf.add_argument("--tokenizer", type=Path, help="tokenizer dir to copy (default: the checkpoint's own, "
                       "else its run's data.tokenizer, else the Qwen2.5 tokenizer)")
    to_hf.add_argument("--rope-scaling", choices=("yarn",),
                       help="write this rope_scaling into config.json (e.g. to serve beyond the trained context)")
    to_hf.add_argument("--rope-factor", type=float, help="YaRN factor (with --rope-scaling), e.g. 4")
    to_hf.add_argument("--original-max-position-embeddings", type=int,
                       help="context the model was trained at (with --rope-scaling), e.g. 32768")
    check = sub.add_parser("verify", help="logit parity of transformers vs our model at a TP/PP/EP/CP layout")
    check.add_argument("--hf", type=Path, required=True)
    check.add_argument("--ckpt", type=Path, required=True)
    for name in ("tp", "pp", "ep", "cp"):
        check.add_argument(f"--{name}", type=int, default=1)
    check.add_argument("--tolerance", type=float, default=1e-3, help="max abs logit difference (default 1e-3)")
    check.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                       help="precision of both forward passes (default fp32)")
    check.add_argument("--batch-size", type=int, default=4)
    check.add_argument("--seq-len", type=int, default=32)
    for p in (to_mcore, to_hf):
        p.add_argument("--no-progress", action="store_true")
    return parser


def _hf_to_mcore(args: argparse.Namespace) -> int:
    from megatron_qwen.convert.hf_to_mcore import hf_to_mcore
    from megatron_qwen.convert.run_files import MODEL_GROUP_FILE

    hf_to_mcore(args.hf, args.out, progress=not args.no_progress)
    out = args.out.absolute()
    print(f"wrote {out}; train from it with:\n  python -m megatron_qwen.train --config-dir "
          f"{out / MODEL_GROUP_FILE.parent.parent} model=converted checkpoint.load={out}")
    return 0


def _rope_scaling(args: argparse.Namespace):
    from megatron_qwen.config.schema import RopeScalingConfig
    from megatron_qwen.convert.staging import ConvertError

    flags = {"--rope-scaling": args.rope_scaling, "--rope-factor": args.rope_factor,
             "--original-max-position-embeddings": args.original_max_position_embeddings}
    missing = [flag for flag, value in flags.items() if value is None]
    if len(missing) == len(flags):
        return None
    if missing:
        raise ConvertError(f"{', '.join(f for f in flags if f not in missing)} also needs {', '.join(missing)}")
    return RopeScalingConfig(args.rope_scaling, args.rope_factor, args.original_max_position_embeddings)


def _mcore_to_hf(args: argparse.Namespace) -> int:
    from megatron_qwen.convert.hf_config import CLI_DTYPES
    from megatron_qwen.convert.hf_files import parse_size
    from megatron_qwen.convert.mcore_to_hf import mcore_to_hf

    dtype = CLI_DTYPES[args.dtype] if args.dtype else None
    mcore_to_hf(args.ckpt, args.out, dtype=dtype, shard_size=parse_size(args.shard_size),
                tokenizer=args.tokenizer, progress=not args.no_progress, rope_scaling=_rope_scaling(args))
    print(f"wrote {args.out.absolute()}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from megatron_qwen.convert.verify import Layout, verify, within

    [parity] = verify(args.hf, args.ckpt, [Layout(args.tp, args.pp, args.ep, args.cp)], args.batch_size,
                      args.seq_len, dtype=args.dtype)
    ok = within(parity, args.tolerance)
    if not ok:
        print(f"logits differ by {parity.max_abs_diff:.3g} > tolerance {args.tolerance:g}", file=sys.stderr)
    print(json.dumps({"max_abs_diff": parity.max_abs_diff, "mean_abs_diff": parity.mean_abs_diff,
                      "top1_agree": parity.top1_agree}))
    return 0 if ok else 1


def main(argv=None) -> int:
    """Runs one subcommand; returns the exit code."""
    # NOTE: megatron-core and torch.distributed.checkpoint warn on import and on every load
    # about optional kernels (apex, Transformer Engine) and their own deprecations; none of
    # it concerns a conversion, and it would bury the one-line error this CLI promises.
    warnings.filterwarnings("ignore", module=r"(megatron|torch)\.")
    args = _parser().parse_args(argv)
    command = {"hf-to-mcore": _hf_to_mcore, "mcore-to-hf": _mcore_to_hf, "verify": _verify}[args.command]
    try:
        return command(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
