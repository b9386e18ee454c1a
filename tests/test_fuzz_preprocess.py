"""Fuzzed inputs for tools/preprocess_data.py: every bad input ends in exit code 2, one
``error:`` line, no traceback and no output; every good one in exit code 0 and a dataset."""

from __future__ import annotations

import gzip
import io
import json
import sys
import tempfile
from pathlib import Path

from hypothesis import event, given
from hypothesis import strategies as st

from tests.fuzz_support import assert_clean_failure, call_main, fuzz, outcome, tree
from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "tools"))
import preprocess_data  # noqa: E402  (the CLI module under test)

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=20)
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8)
roles = st.sampled_from(["system", "user", "assistant", "tool", "bot", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": json_scalars | json_values},
                                          optional={"tool_calls": json_values}), max_size=4) | json_values
conversations = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["system", "user", "assistant"]),
                                                "content": st.text(max_size=30)}), min_size=1, max_size=4)
records = st.dictionaries(st.sampled_from(["text", "messages", "body", "", "\u00e9"]),
                          st.text(max_size=40) | messages | json_values, max_size=3) | json_values
good_records = st.one_of(st.builds(lambda t: {"text": t}, st.text(max_size=60)),
                         st.builds(lambda m: {"messages": m}, conversations))


def _deep(depth: int) -> bytes:
    return b'{"text": ' + b"[" * depth + b"]" * depth + b"}"


lines = st.one_of(
    good_records.map(lambda r: json.dumps(r).encode()),
    good_records.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
    records.map(lambda r: json.dumps(r).encode()),
    st.binary(max_size=40),  # random bytes (newlines included)
    records.map(lambda r: json.dumps(r).encode()).flatmap(  # invalid UTF-8 inside a record
        lambda b: st.integers(0, len(b)).map(lambda i: b[:i] + b"\xff\xfe" + b[i:])),
    st.sampled_from([10, 1000, 100_000]).map(_deep),  # deep JSON nesting
    st.sampled_from([b" ", b"x", b"\xc3"]).map(lambda c: b'{"text": "' + c * 300_000 + b'"}'),  # huge lines
    st.just(b'{"text": "' + b"y" * 300_000),  # a huge unterminated line
    st.just(b'{"text": ' + b"9" * 5000 + b"}"),  # an integer past Python's 4300-digit limit
)
contents = st.lists(lines, max_size=5).map(lambda ls: b"\n".join(ls) + b"\n") | st.binary(max_size=200)


def _gzip(data: bytes, cut: float) -> bytes:
    packed = gzip.compress(data)
    return packed[:int(len(packed) * cut)] if cut < 1 else packed


def _parquet(columns: dict) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table(columns), sink)
    return sink.getvalue()


def _damage(data: bytes, at: int, garbage: bytes) -> bytes:
    return data[:at] + garbage + data[at + len(garbage):]


def _columns(rows: int) -> st.SearchStrategy:
    column = st.one_of(st.lists(st.text(max_size=20) | st.none(), min_size=rows, max_size=rows),
                       st.lists(st.integers(-5, 5), min_size=rows, max_size=rows),
                       st.lists(conversations, min_size=rows, max_size=rows))
    return st.dictionaries(st.sampled_from(["text", "messages", "body"]), column, min_size=1, max_size=2)


parquet_columns = st.integers(1, 3).flatmap(_columns)

files = st.one_of(
    st.tuples(st.just("in.jsonl"), contents),
    st.tuples(st.just("in.jsonl"), contents),
    st.tuples(st.just("in.jsonl"), st.just(b"")),  # empty file
    st.tuples(st.just("in.jsonl.gz"), st.builds(_gzip, contents, st.sampled_from([0.0, 0.3, 0.7, 0.95, 1.0]))),
    st.tuples(st.just("in.parquet"), st.binary(max_size=300)),  # parquet garbage
    st.tuples(st.just("in.parquet"), st.builds(lambda b, cut: b[:int(len(b) * cut)], parquet_columns.map(_parquet),
                                               st.sampled_from([0.5, 0.9, 1.0]))),
    st.tuples(st.just("in.parquet"), st.builds(_damage, parquet_columns.map(_parquet), st.integers(4, 60),
                                               st.binary(min_size=1, max_size=8))),  # garbage inside, footer intact
    st.tuples(st.sampled_from(["missing.jsonl", "a_directory"]), st.none()),
)
flags = st.fixed_dictionaries({
    "--json-key": st.sampled_from([None, "text", "messages", "body", ""]),
    "--split-chars": st.sampled_from([None, "-3", "0", "8"]),
    "--skip-bad-lines": st.booleans(), "--chat": st.booleans(),
})


def _argv(inputs, prefix, options) -> list:
    argv = ["--input", *map(str, inputs), "--output-prefix", str(prefix), "--quiet"]
    for flag, value in options.items():
        if value is True:
            argv.append(flag)
        elif isinstance(value, str):
            argv += [flag, value]
    return argv


def _write(root: Path, index: int, name: str, data) -> Path:
    path = root / f"{index}_{name}"
    if name == "a_directory":
        path.mkdir()
    elif data is not None:
        path.write_bytes(data)
    return path


@fuzz(max_examples=220)
@given(inputs=st.lists(files, min_size=1, max_size=3), options=flags, nested=st.booleans())
def test_preprocess_fails_cleanly_or_writes_a_dataset(inputs, options, nested):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        paths = [_write(root, i, name, data) for i, (name, data) in enumerate(inputs)]
        before = tree(root)
        prefix = root / "new" / "dir" / "out" if nested else root / "out"
        code, _, err = call_main(preprocess_data.main, _argv(paths, prefix, options))
        event(outcome(code, err))
        if code == 0:
            suffixes = ["", "_loss_mask"] if options["--chat"] else [""]
            written = {str((prefix.parent / f"out{s}{ext}").relative_to(root)) for s in suffixes for ext in (".bin", ".idx")}
            assert written <= tree(root) and not [p for p in tree(root) - before if ".tmp" in p], err
        else:
            assert_clean_failure(code, err, sorted(tree(root) - before), case=str(inputs)[:300])


def test_cli_bad_input_with_workers_is_one_line_in_a_real_process(tmp_path):
    # The in-process cases use one worker and cannot see what only a fresh process prints
    # (import warnings, a worker's traceback): one representative case through the real CLI.
    good = json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]})
    (tmp_path / "in.jsonl").write_text("\n".join([good] * 300 + ['{"messages": ' + "[" * 50_000]) + "\n")
    proc = run_cli([sys.executable, str(REPO / "tools" / "preprocess_data.py"), "--input", str(tmp_path / "in.jsonl"),
                    "--output-prefix", str(tmp_path / "new" / "out"), "--chat", "--workers", "2"], check=False)
    lines = [line for line in proc.stderr.strip().splitlines() if not line.startswith("tokenizing:")]  # the bar
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert lines[0].startswith(f"error: {tmp_path / 'in.jsonl'}:301: JSON nested too deeply"), lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl"]
