"""tools/preprocess_data.py: exact token ids, read-back, formats, workers and every bad input."""

from __future__ import annotations

import gzip
import json
import sys
import zlib

import numpy as np
import pytest
from megatron.core.datasets.indexed_dataset import IndexedDataset

from megatron_qwen.data.preprocess import (LOSS_MASK_SUFFIX, InputError, PreprocessOptions, preprocess,
                                           split_document)
from megatron_qwen.data.tokenizer import EOD_TOKEN_ID, load_tokenizer
from tests.data_support import CORPUS, WHITESPACE_ONLY, hf_qwen2_5_tokenizer, write_jsonl
from tests.helpers import REPO, run_cli

sys.path.insert(0, str(REPO / "tools"))
import preprocess_data  # noqa: E402  (the CLI module under test)

QUIET = PreprocessOptions(progress=False)


@pytest.fixture(scope="module")
def hf_ids(tmp_path_factory):
    hf = hf_qwen2_5_tokenizer(tmp_path_factory.mktemp("qwen2_5"))
    return [hf(text, add_special_tokens=False)["input_ids"] + [EOD_TOKEN_ID] for text in CORPUS]


def _documents(prefix) -> list:
    dataset = IndexedDataset(str(prefix))
    assert list(dataset.document_indices) == list(range(len(dataset) + 1))  # one sequence per document
    return [dataset[i].tolist() for i in range(len(dataset))]


def test_ids_equal_transformers_and_read_back(tmp_path, hf_ids):
    records = [{"text": t} for t in CORPUS] + [{"text": t} for t in WHITESPACE_ONLY]
    source = write_jsonl(tmp_path / "corpus.jsonl", records, blank_lines=True)
    stats = preprocess([str(source)], str(tmp_path / "out"), QUIET)
    assert _documents(tmp_path / "out") == hf_ids
    assert (stats.documents, stats.empty, stats.bad_lines) == (len(CORPUS), len(WHITESPACE_ONLY), 0)
    assert stats.tokens == sum(map(len, hf_ids))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.jsonl", "out.bin", "out.idx"]


def test_gzip_parquet_and_workers_give_the_same_documents(tmp_path, hf_ids):
    import pyarrow as pa
    import pyarrow.parquet as pq

    lines = "".join(json.dumps({"body": t}) + "\n" for t in CORPUS).encode()
    with gzip.open(tmp_path / "c.jsonl.gz", "wb") as f:
        f.write(lines)
    pq.write_table(pa.table({"body": CORPUS, "id": list(range(len(CORPUS)))}), tmp_path / "c.parquet")
    for source, workers in (("c.jsonl.gz", 1), ("c.parquet", 2)):
        options = PreprocessOptions(json_key="body", workers=workers, progress=False)
        preprocess([str(tmp_path / source)], str(tmp_path / source), options)
        assert _documents(tmp_path / source) == hf_ids, source


def test_multiple_inputs_keep_order_across_worker_batches(tmp_path):
    texts = [f"document {i} " + "x" * (i % 13) for i in range(700)]  # several worker batches
    write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in texts[:400]])
    write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in texts[400:]])
    inputs = [str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    preprocess(inputs, str(tmp_path / "one"), QUIET)
    preprocess(inputs, str(tmp_path / "two"), PreprocessOptions(workers=2, progress=False))
    one, two = _documents(tmp_path / "one"), _documents(tmp_path / "two")
    assert one == two and len(one) == 700
    assert [load_tokenizer().decode(d[:-1]) for d in one] == texts


def test_split_document_pieces_each_get_eod(tmp_path):
    text = "".join(f"paragraph {i} " + "y" * 50 + "\n\n" for i in range(20))
    pieces = split_document(text, 200)
    assert "".join(pieces) == text and len(pieces) > 3 and all(len(p) <= 200 for p in pieces)
    write_jsonl(tmp_path / "s.jsonl", [{"text": text}])
    stats = preprocess([str(tmp_path / "s.jsonl")], str(tmp_path / "s"),
                       PreprocessOptions(split_chars=200, progress=False))
    docs = _documents(tmp_path / "s")
    assert stats.documents == len(pieces) == len(docs)
    assert all(d[-1] == EOD_TOKEN_ID and EOD_TOKEN_ID not in d[:-1] for d in docs)


def _bad_inputs():
    """(file name, content bytes, expected line, message fragment) per bad-input case."""
    good = b'{"text": "fine"}\n'
    truncated = gzip.compress(good * 50)[:40]
    # The line that cannot be completed: one past the lines the truncated stream still holds.
    readable = zlib.decompressobj(wbits=31).decompress(truncated)
    return [
        ("malformed.jsonl", good + b'{"text": "unterminated\n', 2, "malformed JSON"),
        ("missing_key.jsonl", good + good + b'{"body": "x"}\n', 3, "no key 'text'"),
        ("not_string.jsonl", good + b'{"text": 42}\n', 2, "'text' is int"),
        ("null.jsonl", b'{"text": null}\n', 1, "'text' is NoneType"),
        ("array.jsonl", good + b'["text"]\n', 2, "expected a JSON object"),
        ("bad_utf8.jsonl", good + b'{"text": "\xff\xfe"}\n', 2, "not valid UTF-8"),
        ("not_gzip.jsonl.gz", good, 1, "cannot read file"),
        ("truncated.jsonl.gz", truncated, readable.count(b"\n") + 1, "cannot read file"),
    ]


@pytest.mark.parametrize("case", range(8))
def test_bad_input_fails_with_file_line_and_leaves_nothing(tmp_path, capsys, case):
    name, content, line, fragment = _bad_inputs()[case]
    (tmp_path / name).write_bytes(content)
    code = preprocess_data.main(["--input", str(tmp_path / name), "--output-prefix", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and err[0].startswith(f"error: {tmp_path / name}:{line}: ") and fragment in err[0], err
    assert sorted(p.name for p in tmp_path.iterdir()) == [name]  # no .bin/.idx, no temporaries


def test_unreadable_file_fails_even_when_skipping_bad_lines(tmp_path, capsys):
    for target in (tmp_path / "missing.jsonl", tmp_path):  # absent, and a directory
        code = preprocess_data.main(["--input", str(target), "--output-prefix", str(tmp_path / "out"),
                                     "--skip-bad-lines", "--quiet"])
        err = capsys.readouterr().err.strip()
        assert code != 0 and err.startswith(f"error: {target}:1: cannot read file") and "\n" not in err
    assert not list(tmp_path.glob("out*"))


def test_skip_bad_lines_counts_exactly_the_bad_lines(tmp_path):
    lines = [b'{"text": "good one"}', b"{broken", b'{"text": 1}', b'{"other": "x"}', b'{"text": "   "}',
             b'{"text": "\xff"}', b"", b'{"text": "good two"}', b"[]"]
    (tmp_path / "mixed.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    options = PreprocessOptions(skip_bad_lines=True, progress=False)
    stats = preprocess([str(tmp_path / "mixed.jsonl")], str(tmp_path / "out"), options)
    assert (stats.documents, stats.bad_lines, stats.empty) == (2, 5, 1)
    assert len(_documents(tmp_path / "out")) == 2
    with pytest.raises(InputError, match=r"mixed.jsonl:2: malformed JSON"):
        preprocess([str(tmp_path / "mixed.jsonl")], str(tmp_path / "strict"), QUIET)


def test_parquet_missing_column_and_bad_rows(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nocol.parquet")
    with pytest.raises(InputError, match=r"nocol.parquet:1: no column 'text'"):
        preprocess([str(tmp_path / "nocol.parquet")], str(tmp_path / "o1"), QUIET)
    pq.write_table(pa.table({"text": ["a", None, "c"]}), tmp_path / "nulls.parquet")
    with pytest.raises(InputError, match=r"nulls.parquet:2: 'text' is NoneType"):
        preprocess([str(tmp_path / "nulls.parquet")], str(tmp_path / "o2"), QUIET)
    stats = preprocess([str(tmp_path / "nulls.parquet")], str(tmp_path / "o3"),
                       PreprocessOptions(skip_bad_lines=True, progress=False))
    assert (stats.documents, stats.bad_lines) == (2, 1)
    assert not list(tmp_path.glob("o1*")) + list(tmp_path.glob("o2*"))


def test_chat_mode_writes_loss_mask_companion(tmp_path):
    conversations = [{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]},
                     {"messages": [{"role": "user", "content": "no answer"}]}]
    write_jsonl(tmp_path / "chat.jsonl", conversations)
    options = PreprocessOptions(chat=True, skip_bad_lines=True, progress=False)
    stats = preprocess([str(tmp_path / "chat.jsonl")], str(tmp_path / "chat"), options)
    assert (stats.documents, stats.bad_lines) == (1, 1)
    tokens, masks = IndexedDataset(str(tmp_path / "chat")), IndexedDataset(str(tmp_path / "chat") + LOSS_MASK_SUFFIX)
    assert masks[0].dtype == np.uint8 and len(masks[0]) == len(tokens[0]) and 0 < masks[0].sum() < len(masks[0])


def test_cli_end_to_end(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": t} for t in CORPUS[:3]])
    proc = run_cli([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "in.jsonl"),
                    "--output-prefix", str(tmp_path / "out"), "--workers", "2"])
    assert "3 documents" in proc.stdout and "tokens/s" in proc.stdout
    assert IndexedDataset.exists(str(tmp_path / "out"))
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\n')
    proc = run_cli([sys.executable, "tools/preprocess_data.py", "--input", str(tmp_path / "bad.jsonl"),
                    "--output-prefix", str(tmp_path / "bad")], check=False)
    assert proc.returncode == 2 and f"{tmp_path / 'bad.jsonl'}:1:" in proc.stderr
    assert not list(tmp_path.glob("bad.*[bx]"))


def test_unwritable_output_is_one_error_line(tmp_path, capsys):
    write_jsonl(tmp_path / "in.jsonl", [{"text": "x"}])
    (tmp_path / "file").write_text("")
    code = preprocess_data.main(["--input", str(tmp_path / "in.jsonl"), "--output-prefix",
                                 str(tmp_path / "file" / "out"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: cannot write") and "\n" not in err
