"""JSONL / JSONL.gz / Parquet -> megatron-core indexed dataset (``PREFIX.bin`` + ``PREFIX.idx``).

One input record is one document: its tokens followed by EOD (``<|endoftext|>``).
Optionally a long document is split at blank lines into documents of about
``split_chars`` characters, each with its own EOD (megatron's ``GPTDataset`` shuffles
documents, so the pieces must stand alone). Documents with no non-whitespace character
are skipped and counted; blank lines of a JSONL file are not records and are ignored.

With ``chat=True`` a record is an SFT conversation (default key ``messages``), rendered
with the Qwen2.5 chat template (:mod:`megatron_qwen.data.sft`); the loss mask goes to a
companion dataset ``PREFIX_loss_mask`` (uint8, same document layout) and no EOD is added.
With ``preference=True`` a record is a preference pair (keys ``prompt``, ``chosen``,
``rejected``; :mod:`megatron_qwen.data.preference`): one document of two sequences, chosen
then rejected, with the same loss-mask companion.

Bad input (malformed JSON, missing key, wrong type, invalid UTF-8) stops the run with
one line naming file and line, unless ``skip_bad_lines`` counts and skips it; an
unreadable file always stops it. Outputs are written under a temporary name and renamed
only when complete, so a failed run leaves no ``.bin``/``.idx`` behind.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
from tqdm import tqdm

from megatron_qwen.data.preference import check_pair, pair_messages, tokenize_pair
from megatron_qwen.data.records import InputError, read_values
from megatron_qwen.data.sft import check_messages, tokenize_conversation
from megatron_qwen.data.tokenizer import QwenTokenizer, load_tokenizer

LOSS_MASK_SUFFIX = "_loss_mask"
BATCH_DOCS = 128  # records per worker task: large enough to amortize IPC, small for steady progress


@dataclass
class PreprocessOptions:
    """What to read and how to tokenize it."""

    json_key: Optional[str] = None  # None = "text", or "messages" with chat=True
    tokenizer: Optional[str] = None  # HF tokenizer dir; None = the default Qwen2.5 tokenizer
    workers: int = 1
    skip_bad_lines: bool = False
    split_chars: int = 0  # 0 = one document per record
    chat: bool = False
    preference: bool = False  # records are {"prompt", "chosen", "rejected"} pairs
    progress: bool = True

    @property
    def key(self) -> Optional[str]:
        """The field holding a record (None: the whole JSON object / Parquet row)."""
        if self.preference:
            return None
        return self.json_key or ("messages" if self.chat else "text")

    @property
    def masked(self) -> bool:
        """Whether a loss-mask companion is written (chat and preference data)."""
        return self.chat or self.preference


@dataclass
class PreprocessStats:
    """Counts reported at the end of a run."""

    documents: int = 0
    tokens: int = 0
    empty: int = 0
    bad_lines: int = 0
    input_bytes: int = 0
    output_bytes: int = 0
    seconds: float = 0.0
    bad_examples: List[str] = field(default_factory=list)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)

    def summary(self) -> str:
        """One line: documents, tokens, throughput, bytes and what was skipped."""
        return (f"{self.documents:,} documents | {self.tokens:,} tokens | {self.tokens_per_second:,.0f} tokens/s"
                f" | {self.input_bytes / 1e6:.2f} MB text -> {self.output_bytes / 1e6:.2f} MB .bin"
                f" | skipped {self.empty:,} empty, {self.bad_lines:,} bad lines | {self.seconds:.1f} s")


# ----------------------------------------------------------------------------- checking (reading: data/records.py)


def _record_problem(value: object, key: Optional[str], options: PreprocessOptions) -> Optional[str]:
    if options.preference:
        return check_pair(value)
    if options.chat:
        problem = check_messages(value)
        return None if problem is None else f"{key!r}: {problem}"
    if not isinstance(value, str):
        return f"{key!r} is {type(value).__name__}, expected a string"
    return None


def iter_records(paths: Sequence[str], options: PreprocessOptions, stats: PreprocessStats) -> Iterator[object]:
    """Usable records of every input in order; bad ones raise or are counted and skipped."""
    for name in paths:
        path = Path(name)
        for line_no, value, problem in read_values(path, options.key):
            problem = problem or _record_problem(value, options.key, options)
            if problem is None:
                yield value
                continue
            if not options.skip_bad_lines:
                raise InputError(f"{path}:{line_no}: {problem}; fix the line or pass --skip-bad-lines")
            stats.bad_lines += 1
            if len(stats.bad_examples) < 5:
                stats.bad_examples.append(f"{path}:{line_no}: {problem}")


# ----------------------------------------------------------------------------- tokenizing


def split_document(text: str, max_chars: int) -> List[str]:
    """Pieces of ``text`` cut after blank lines, each about ``max_chars`` long (a longer
    paragraph stays whole); the pieces concatenate back to ``text``."""
    if max_chars <= 0 or len(text) <= max_chars:
        return [text]
    pieces, current = [], ""
    for paragraph in re.split(r"(?<=\n\n)", text):
        if current and len(current) + len(paragraph) > max_chars:
            pieces.append(current)
            current = ""
        current += paragraph
    return pieces + [current] if current else pieces


# One document: token ids, loss mask (chat and preference only), its sequences' lengths.
Encoded = Tuple[np.ndarray, Optional[np.ndarray], List[int]]
_worker_state: dict = {}


def _init_worker(tokenizer_dir: Optional[str], kind: str, split_chars: int) -> None:
    _worker_state.update(tokenizer=load_tokenizer(tokenizer_dir), kind=kind, split_chars=split_chars)


def _document(sequences: List[Tuple[np.ndarray, np.ndarray]]) -> Encoded:
    """One document of one or more (ids, mask) sequences."""
    ids, masks = zip(*sequences)
    return np.concatenate(ids), np.concatenate(masks), [len(i) for i in ids]


def _encode_records(records: List[object]) -> List[Encoded]:
    """Runs in a worker (or in-process): records -> documents with EOD (text) or masks (chat,
    preference: one document of two sequences per pair)."""
    tokenizer: QwenTokenizer = _worker_state["tokenizer"]
    if _worker_state["kind"] == "chat":
        return [_document([tokenize_conversation(messages, tokenizer)]) for messages in records]
    if _worker_state["kind"] == "preference":
        return [_document(tokenize_pair(record, tokenizer)) for record in records]
    out: List[Encoded] = []
    for text in records:
        for piece in split_document(text, _worker_state["split_chars"]):
            ids = tokenizer.encode(piece)
            ids.append(tokenizer.eod)
            out.append((np.asarray(ids, dtype=np.int64), None, [len(ids)]))
    return out


def _record_text(record: object, options: PreprocessOptions) -> str:
    """The characters of a record (for the byte count and the empty-document check)."""
    if options.preference:
        return "".join(m["content"] for part in pair_messages(record) for m in part)
    return "".join(m["content"] for m in record) if options.chat else record


def _batches(records: Iterator[object], options: PreprocessOptions, stats: PreprocessStats) -> Iterator[List[object]]:
    batch: List[object] = []
    for record in records:
        text = _record_text(record, options)
        if not options.masked and not text.strip():
            stats.empty += 1
            continue
        stats.input_bytes += len(text.encode("utf-8"))
        batch.append(record)
        if len(batch) == BATCH_DOCS:
            yield batch
            batch = []
    if batch:
        yield batch


def _encoded_batches(batches: Iterator[List[object]], options: PreprocessOptions) -> Iterator[List[Encoded]]:
    """Encodes batches in order, on ``options.workers`` processes when more than one."""
    kind = "preference" if options.preference else "chat" if options.chat else "text"
    init_args = (options.tokenizer, kind, options.split_chars)
    if options.workers <= 1:
        _init_worker(*init_args)
        yield from map(_encode_records, batches)
        return
    # NOTE: fork, not spawn: workers inherit the imported modules instead of paying the
    # torch/megatron import again. A bounded window keeps memory flat on huge inputs.
    with multiprocessing.get_context("fork").Pool(options.workers, _init_worker, init_args) as pool:
        pending = []
        for batch in batches:
            pending.append(pool.apply_async(_encode_records, (batch,)))
            if len(pending) >= 2 * options.workers:
                yield pending.pop(0).get()
        for result in pending:
            yield result.get()


# ----------------------------------------------------------------------------- writing


class _Writer:
    """Indexed-dataset builders writing under a temporary prefix, renamed on commit."""

    def __init__(self, prefix: str, vocab_size: int, masked: bool) -> None:
        self.prefix = prefix
        self.tmp = f"{prefix}.tmp{os.getpid()}"
        self.names = [""] + ([LOSS_MASK_SUFFIX] if masked else [])
        # Directories created for the output go again on abort: a failed run leaves nothing.
        self.created = [p for p in Path(prefix).parents if not p.exists()]  # deepest first
        for directory in reversed(self.created):
            directory.mkdir(exist_ok=True)
        dtypes = [DType.optimal_dtype(vocab_size), np.uint8]
        self.builders = []
        try:
            for name, dtype in zip(self.names, dtypes):
                self.builders.append(IndexedDatasetBuilder(f"{self.tmp}{name}.bin", dtype=dtype))
        except BaseException:
            self.abort()
            raise

    def add(self, ids: np.ndarray, mask: Optional[np.ndarray], lengths: List[int]) -> None:
        for builder, array in zip(self.builders, (ids, mask)):
            builder.add_document(array, lengths)

    def commit(self) -> int:
        """Finalizes, renames into place and returns the size of the token ``.bin``."""
        for name, builder in zip(self.names, self.builders):
            builder.finalize(f"{self.tmp}{name}.idx")
        for name in self.names:
            os.replace(f"{self.tmp}{name}.bin", f"{self.prefix}{name}.bin")
            os.replace(f"{self.tmp}{name}.idx", f"{self.prefix}{name}.idx")
        return Path(f"{self.prefix}.bin").stat().st_size

    def abort(self) -> None:
        for builder in self.builders:
            builder.data_file.close()
        for name in self.names:
            for ext in (".bin", ".idx"):
                Path(f"{self.tmp}{name}{ext}").unlink(missing_ok=True)
        for directory in self.created:
            with contextlib.suppress(OSError):  # not empty: someone else writes there too
                directory.rmdir()


def preprocess(inputs: Sequence[str], output_prefix: str, options: PreprocessOptions) -> PreprocessStats:
    """Converts ``inputs`` into ``output_prefix.bin/.idx`` and returns the run's counts.

    Raises:
        InputError: on bad input (see the module docstring); nothing is left on disk.
        TokenizerError: when the tokenizer cannot be loaded.
    """
    tokenizer = load_tokenizer(options.tokenizer)
    stats, start = PreprocessStats(), time.perf_counter()
    writer = _Writer(output_prefix, tokenizer.vocab_size, options.masked)
    bar = tqdm(desc="tokenizing", unit=" docs", disable=not options.progress, dynamic_ncols=True)
    try:
        batches = _batches(iter_records(inputs, options, stats), options, stats)
        for encoded in _encoded_batches(batches, options):
            for ids, mask, lengths in encoded:
                writer.add(ids, mask, lengths)
                stats.tokens += len(ids)
            stats.documents += len(encoded)
            bar.update(len(encoded))
            bar.set_postfix(tokens=f"{stats.tokens:,}", refresh=False)
        stats.output_bytes = writer.commit()
    except BaseException:
        writer.abort()
        raise
    finally:
        bar.close()
    stats.seconds = time.perf_counter() - start
    return stats
