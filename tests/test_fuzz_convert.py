"""Fuzzed inputs for tools/convert.py (hf-to-mcore, mcore-to-hf, verify).

A tiny HF model and its converted checkpoint are damaged in generated ways (config
fields removed, retyped or contradictory; safetensors truncated, overwritten, with
tensors missing, added, reshaped or retyped; index files naming missing shards;
checkpoint files truncated, overwritten or deleted; run configs edited). Every case
must end in exit code 2 with one ``error:`` line, no traceback and nothing left where
the output would have gone, or succeed with a complete output.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Tuple
from unittest import mock

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from tests.convert_support import make_hf_model
from tests.fuzz_support import assert_clean_failure, call_main, fuzz, outcome, tree
from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "tools"))
import convert  # noqa: E402  (the CLI module under test)

CONFIG_FIELDS = ["architectures", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "head_dim", "vocab_size", "rms_norm_eps", "max_position_embeddings",
                 "tie_word_embeddings", "rope_theta", "rope_scaling", "torch_dtype", "hidden_act", "use_sliding_window",
                 "initializer_range", "num_experts", "model_type"]
values = st.one_of(st.integers(-2, 200), st.sampled_from([0, -1, 7, 10**12, 2**63]), st.floats(allow_nan=True),
                   st.text(max_size=8), st.none(), st.booleans(), st.lists(st.integers(-1, 4), max_size=2),
                   st.dictionaries(st.sampled_from(["type", "factor", "rope_type"]), st.text(max_size=5) | st.integers(),
                                   max_size=2))
# Sizes that keep the numbers whole but contradict each other (heads vs hidden, kv vs heads).
contradictions = st.sampled_from([
    {"num_attention_heads": 5}, {"num_key_value_heads": 4}, {"num_key_value_heads": 3}, {"hidden_size": 50},
    {"head_dim": 7}, {"intermediate_size": 64}, {"vocab_size": 255}, {"num_hidden_layers": 3},
    {"num_attention_heads": 0}, {"num_key_value_heads": 0}, {"hidden_size": -48}, {"num_hidden_layers": 0},
    {"architectures": ["Qwen2MoeForCausalLM"]}, {"tie_word_embeddings": True}, {"torch_dtype": "int8"}])
unsupported_dtypes = st.sampled_from([torch.int32, torch.float64, torch.int8, torch.bool, torch.uint8, torch.float16])
hf_ops = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(CONFIG_FIELDS), values),
    st.tuples(st.just("merge"), contradictions),
    st.tuples(st.just("drop"), st.sampled_from(CONFIG_FIELDS)),
    st.tuples(st.just("config_bytes"), st.binary(max_size=30) | st.sampled_from([b"[]", b"3", b"null", b'"x"'])),
    st.tuples(st.just("tensor_drop"), st.integers(0, 50)),
    st.tuples(st.just("tensor_add"), st.sampled_from(["model.extra.weight", "model.layers.9.mlp.up_proj.weight"])),
    st.tuples(st.just("tensor_shape"), st.integers(0, 50), st.lists(st.integers(0, 9), max_size=3)),
    st.tuples(st.just("tensor_dtype"), st.integers(0, 50), unsupported_dtypes),
    st.tuples(st.just("truncate"), st.floats(0, 1)),
    st.tuples(st.just("garbage"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("index"), st.sampled_from(["missing_shard", "garbage", "not_a_map", "names_unknown", "split"])),
    st.tuples(st.just("no_weights")),
)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple:
    """A tiny untied HF model and its converted checkpoint (read-only: cases work on copies)."""
    root = tmp_path_factory.mktemp("fuzz_convert")
    hf = make_hf_model(root / "hf", layers=1, hidden=16, ffn=32, heads=4, kv=2, vocab=64)
    code, _, err = call_main(convert.main, ["hf-to-mcore", "--hf", str(hf), "--out", str(root / "ckpt"),
                                            "--no-progress"])
    assert code == 0, err
    return hf, root / "ckpt"


def _edit_config(hf: Path, edit) -> None:
    path = hf / "config.json"
    try:
        config = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError):
        return  # already replaced by garbage
    if isinstance(config, dict):
        edit(config)
        path.write_text(json.dumps(config))


def _edit_tensors(hf: Path, edit) -> None:
    path = hf / "model.safetensors"
    try:
        tensors = load_file(str(path))
    except Exception:  # already damaged or gone: nothing to edit
        return
    names = sorted(tensors)
    edit(tensors, names)
    save_file(tensors, str(path), metadata={"format": "pt"})


def _write_index(hf: Path, kind: str) -> None:
    index = hf / "model.safetensors.index.json"
    if not (hf / "model.safetensors").exists():
        return
    names = sorted(load_file(str(hf / "model.safetensors")))
    if kind == "garbage":
        index.write_bytes(b"\x00{not json")
    elif kind == "not_a_map":
        index.write_text(json.dumps({"weight_map": names}))
    elif kind == "names_unknown":
        index.write_text(json.dumps({"weight_map": {"model.nothing.weight": "model.safetensors"}}))
    elif kind == "split":  # a valid two-shard index where the second shard is an empty file
        (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
        (hf / "model-00002-of-00002.safetensors").write_bytes(b"")
        index.write_text(json.dumps({"weight_map": {n: f"model-0000{1 + i % 2}-of-00002.safetensors"
                                                    for i, n in enumerate(names)}}))
    else:
        (hf / "model.safetensors").rename(hf / "model-00001-of-00002.safetensors")
        index.write_text(json.dumps({"weight_map": {n: "model-00002-of-00002.safetensors" for n in names}}))


def _damage_file(path: Path, op: str, where: float, garbage: bytes = b"") -> bool:
    """Truncates or overwrites ``path``; True when it cut the file short."""
    if not path.is_file():
        return False
    data = path.read_bytes()
    at = int(len(data) * where)
    path.write_bytes(data[:at] if op == "truncate" else data[:at] + garbage + data[at + len(garbage):])
    return op == "truncate" and at < len(data)


def _apply_hf(hf: Path, op: tuple) -> bool:
    """Applies one damage to an HF directory; True when the weights are now certainly unusable."""
    kind, args = op[0], op[1:]
    cut = False
    if kind == "set":
        _edit_config(hf, lambda c: c.__setitem__(args[0], args[1]))
    elif kind == "merge":
        _edit_config(hf, lambda c: c.update(args[0]))
    elif kind == "drop":
        _edit_config(hf, lambda c: c.pop(args[0], None))
    elif kind == "config_bytes":
        (hf / "config.json").write_bytes(args[0])
    elif kind == "tensor_drop":
        _edit_tensors(hf, lambda t, names: t.pop(names[args[0] % len(names)]))
    elif kind == "tensor_add":
        _edit_tensors(hf, lambda t, names: t.__setitem__(args[0], torch.zeros(16, 16)))
    elif kind == "tensor_shape":
        _edit_tensors(hf, lambda t, names: t.__setitem__(names[args[0] % len(names)], torch.zeros(args[1])))
    elif kind == "tensor_dtype":
        _edit_tensors(hf, lambda t, names: t.__setitem__(names[args[0] % len(names)],
                                                          t[names[args[0] % len(names)]].to(args[1])))
    elif kind in ("truncate", "garbage"):
        cut = _damage_file(hf / "model.safetensors", kind, *args)
    elif kind == "index":
        _write_index(hf, args[0])
    else:
        (hf / "model.safetensors").unlink(missing_ok=True)
    return cut or kind in ("config_bytes", "tensor_drop", "tensor_add", "tensor_shape", "index", "no_weights") or (
        kind == "tensor_dtype" and args[1] != torch.float16)


outputs = st.sampled_from(["fresh", "fresh", "fresh", "nested", "non_empty", "a_file"])


def _output(root: Path, kind: str) -> Path:
    out = root / "out" if kind != "nested" else root / "new" / "dir" / "out"
    if kind == "non_empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
    elif kind == "a_file":
        out.write_text("mine")
    return out


def _check(code: int, err: str, root: Path, before: set, out: Path, case) -> None:
    event(outcome(code, err))
    if code == 0:
        assert (out / "config.json").is_file() or (out / "metadata.json").is_file(), err
        allowed = {str(p.relative_to(root)) for p in out.parents if p != root and root in p.parents}
        assert not [p for p in tree(root) - before if not p.startswith(str(out.relative_to(root))) and p not in allowed]
    else:
        assert_clean_failure(code, err, sorted(tree(root) ^ before), case=str(case)[:400])


@fuzz(max_examples=80)
@given(ops=st.lists(hf_ops, max_size=3), out_kind=outputs)
def test_hf_to_mcore_fails_cleanly_or_converts(base, ops, out_kind):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = Path(shutil.copytree(base[0], root / "hf"))
        for op in sorted(ops, key=lambda o: o[0] in ("truncate", "garbage")):  # byte damage last
            _apply_hf(hf, op)
        out = _output(root, out_kind)
        before = tree(root)
        code, _, err = call_main(convert.main, ["hf-to-mcore", "--hf", str(hf), "--out", str(out), "--no-progress"])
        _check(code, err, root, before, out, ops)


run_config_fields = st.sampled_from(["num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                                     "num_query_groups", "kv_channels", "vocab_size", "tie_word_embeddings",
                                     "num_experts", "rope_theta", "max_position_embeddings", "name"])
ckpt_ops = st.one_of(
    st.tuples(st.sampled_from(["truncate", "garbage"]), st.integers(0, 40), st.floats(0, 1),
              st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.integers(0, 40)),
    st.tuples(st.just("model_field"), run_config_fields, values),
    st.tuples(st.just("run_config_bytes"), st.binary(max_size=40) | st.sampled_from([b"model: 3", b"[]", b"model:"])),
    st.tuples(st.just("latest_marker"), st.sampled_from(["7", "abc", "", "-1", "0"])),
    st.tuples(st.just("not_a_checkpoint"), st.sampled_from(["empty", "random_files", "a_file"])),
)


# Files whose every byte a checkpoint needs (run_config.yaml may lose its tail and still hold the model).
CKPT_CONTENT = re.compile(r"\.metadata|.*\.distcp|metadata\.json|common\.pt")


def _apply_ckpt(ckpt: Path, op: tuple) -> Tuple[Path, bool]:
    """Damages the checkpoint copy; returns the path to pass as --ckpt and whether the checkpoint
    is now certainly unusable (a file it needs cut short or gone, or no checkpoint at all)."""
    kind, args = op[0], op[1:]
    files = sorted(p for p in ckpt.rglob("*") if p.is_file())
    target = files[args[0] % len(files)] if kind in ("truncate", "garbage", "delete") and files else None
    needed = target is not None and CKPT_CONTENT.fullmatch(target.name) is not None
    if kind in ("truncate", "garbage") and target:
        return ckpt, _damage_file(target, kind, args[1], args[2]) and needed
    if kind == "delete" and target:
        target.unlink()
        return ckpt, needed
    if kind == "model_field":
        path = ckpt / "run_config.yaml"
        if path.is_file():
            text = path.read_text(errors="replace")
            value = json.dumps(args[1])
            path.write_text(re.sub(rf"(?m)^  {args[0]}: .*$", lambda _: f"  {args[0]}: {value}", text))
    elif kind == "run_config_bytes":
        (ckpt / "run_config.yaml").write_bytes(args[0])
    elif kind == "latest_marker":  # the checkpoint inside a run's checkpoints/ directory
        run = ckpt.parent / "checkpoints"
        run.mkdir(exist_ok=True)
        ckpt.rename(run / "iter_0000007")
        (run / "latest_checkpointed_iteration.txt").write_text(args[0])
        return run, False
    elif kind == "not_a_checkpoint":
        shutil.rmtree(ckpt)
        if args[0] == "a_file":
            ckpt.write_text("not a checkpoint")
        else:
            ckpt.mkdir()
            if args[0] == "random_files":
                (ckpt / "metadata.json").write_text('{"sharded_backend": "torch_dist"}')
                (ckpt / "run_config.yaml").write_text("model: {}\n")
    return ckpt, kind in ("run_config_bytes", "not_a_checkpoint")


@fuzz(max_examples=80)
@given(ops=st.lists(ckpt_ops, max_size=3), out_kind=outputs,
       dtype=st.sampled_from([None, "bf16", "fp32"]),
       shard_size=st.sampled_from(["5GB", "1", "100KB", "0", "-1", "abc", "1e999", "nan", " 2 KiB"]),
       tokenizer=st.sampled_from([None, "missing", "empty"]))
def test_mcore_to_hf_fails_cleanly_or_exports(base, ops, out_kind, dtype, shard_size, tokenizer):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = Path(shutil.copytree(base[1], root / "ckpt"))
        for op in ops:
            if ckpt.is_dir() and ckpt.name == "ckpt":
                ckpt, _ = _apply_ckpt(ckpt, op)
        argv = ["mcore-to-hf", "--ckpt", str(ckpt), "--out", "", "--shard-size", shard_size, "--no-progress"]
        argv += ["--dtype", dtype] if dtype else []
        if tokenizer:
            (root / "empty").mkdir()
            argv += ["--tokenizer", str(root / tokenizer)]
        out = _output(root, out_kind)
        argv[4] = str(out)
        before = tree(root)
        code, _, err = call_main(convert.main, argv)
        _check(code, err, root, before, out, (ops, shard_size, tokenizer))


class _Spawned(Exception):
    """Raised instead of spawning verify's ranks: the inputs passed every check."""


@fuzz(max_examples=80)
@given(hf_op=st.none() | hf_ops, ckpt_op=st.none() | ckpt_ops,
       layout=st.lists(st.sampled_from(["--tp", "--pp", "--ep", "--batch-size", "--seq-len", "--tolerance"]),
                       max_size=2).map(lambda names: dict.fromkeys(names)).flatmap(
           lambda names: st.fixed_dictionaries({n: st.sampled_from(["0", "-1", "2", "3", "100000", "x", "nan"])
                                                for n in names})))
def test_verify_fails_cleanly_before_starting_ranks(base, hf_op, ckpt_op, layout):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        hf = Path(shutil.copytree(base[0], root / "hf"))
        ckpt = Path(shutil.copytree(base[1], root / "ckpt"))
        broken = bool(hf_op) and _apply_hf(hf, hf_op)
        if ckpt_op:
            ckpt, cut = _apply_ckpt(ckpt, ckpt_op)
            broken = broken or cut
        argv = ["verify", "--hf", str(hf), "--ckpt", str(ckpt)] + [x for kv in layout.items() for x in kv]
        before = tree(root)
        with mock.patch("megatron_qwen.convert.verify.megatron_logits", side_effect=_Spawned):
            try:
                code, _, err = call_main(convert.main, argv)
            except _Spawned:
                event("reached the ranks")
                assert not broken, f"verify would start ranks on broken input {hf_op} {ckpt_op}"
                return
        _check(code, err, root, before, root / "none", (hf_op, ckpt_op, layout))


def test_cli_damaged_checkpoint_is_one_line_in_a_real_process(base, tmp_path):
    # The in-process cases cannot see what only a fresh process prints (import warnings, a
    # traceback from the spawn machinery): one representative case through the real CLI.
    ckpt = Path(shutil.copytree(base[1], tmp_path / "ckpt"))
    shard = sorted(ckpt.glob("*.distcp"))[-1]
    shard.write_bytes(shard.read_bytes()[:10])
    proc = run_cli([sys.executable, str(REPO / "tools" / "convert.py"), "mcore-to-hf", "--ckpt", str(ckpt),
                    "--out", str(tmp_path / "new" / "out")], check=False, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith(f"error: checkpoint file {shard} is "
                                                                           "truncated (10 bytes"), proc.stderr
    assert not (tmp_path / "new").exists()
