"""Reading input records (JSONL, JSONL.gz, Parquet) with the line each came from.

A reader yields ``(line, value, problem)`` per record: ``value`` is the record's ``key`` field
(the whole JSON object / Parquet row when ``key`` is None) and ``problem`` says why it cannot
be used (None when it can). Blank lines of a JSONL file are not records. A file that cannot be
read at all raises :class:`InputError` naming it.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Iterator, Optional, Tuple

from megatron_qwen.errors import UserError

Values = Iterator[Tuple[int, object, Optional[str]]]


class InputError(UserError, ValueError):
    """Input that cannot be converted; the message names file, line, problem and fix."""


def one_line(err: Exception) -> str:
    """An exception's message on one line (pyarrow's messages span several)."""
    return " ".join(str(err).split())


def _jsonl_lines(path: Path) -> Iterator[Tuple[int, bytes]]:
    opener = gzip.open if path.name.endswith(".gz") else open
    line_no = 0
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                yield line_no, raw
    except (OSError, EOFError) as err:  # missing, a directory, corrupt or truncated gzip
        raise InputError(f"{path}:{line_no + 1}: cannot read file ({one_line(err)}); "
                         "check the path and the file") from err


def jsonl_values(path: Path, key: Optional[str]) -> Values:
    """(line, value, problem) per record (value: ``record[key]``, or the record when key is None);
    problem is None for a usable record."""
    for line_no, raw in _jsonl_lines(path):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            yield line_no, None, f"not valid UTF-8 ({err.reason} at byte {err.start})"
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            yield line_no, None, f"malformed JSON ({err.msg} at column {err.colno})"
            continue
        except RecursionError:  # json's recursive decoder gives up around 1000 levels
            yield line_no, None, "JSON nested too deeply to parse"
            continue
        except ValueError as err:  # e.g. an integer past Python's 4300-digit conversion limit
            yield line_no, None, f"unparsable JSON ({err})"
            continue
        if key is None:
            yield line_no, record, None
        elif not isinstance(record, dict):
            yield line_no, None, f"expected a JSON object, got {type(record).__name__}"
        elif key not in record:
            yield line_no, None, f"no key {key!r} (keys: {', '.join(map(str, record)) or 'none'}); choose it with --json-key"
        else:
            yield line_no, record[key], None


def parquet_values(path: Path, key: Optional[str]) -> Values:
    """(row, value, problem) per Parquet row (value: the ``key`` column, or the whole row when key is None)."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (OSError, ValueError) as err:  # pyarrow raises ArrowInvalid (a ValueError) on corrupt files
        raise InputError(f"{path}:1: cannot read file ({one_line(err)}); check the path and the file") from err
    if key is not None and key not in parquet.schema_arrow.names:
        problem = f"no column {key!r} (columns: {', '.join(parquet.schema_arrow.names)}); choose it with --json-key"
        for row in range(1, parquet.metadata.num_rows + 1):
            yield row, None, problem
        return
    row = 0
    try:
        for batch in parquet.iter_batches(columns=None if key is None else [key]):
            # whole rows when key is None, else the key column's values
            for value in batch.to_pylist() if key is None else batch.column(0).to_pylist():
                row += 1
                yield row, value, None
    except (OSError, ValueError) as err:  # a damaged page behind an intact footer
        raise InputError(f"{path}:{row + 1}: cannot read file ({one_line(err)}); "
                         "check the path and the file") from err


def read_values(path: Path, key: Optional[str]) -> Values:
    """(line or row, value, problem) of every record of a JSONL, JSONL.gz or Parquet file."""
    return parquet_values(path, key) if path.suffix == ".parquet" else jsonl_values(path, key)
