"""A small real-text corpus every Python installation carries, for the default job.

Two domains, tokenized on first use into ``<cache root>/embedded/<key>/``:

- ``code``: the standard library's top-level ``*.py`` modules (about 4.7 MB, 1.1M tokens on
  CPython 3.11), one document per file;
- ``prose``: the documentation topics of ``pydoc_data`` (the text behind ``help()``, about
  0.5 MB, 0.1M tokens), one document per topic.

Documents are split at blank lines into pieces of about ``SPLIT_CHARS`` characters so that
megatron's document-level train/valid/test split has enough documents in each part. The
cache key covers the Python version, the source files and the tokenizer, so a different
interpreter or tokenizer builds its own copy. Preparation takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import logging
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional

from megatron_qwen.data.cache import build_once, content_key
from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
from megatron_qwen.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

DOMAINS = ("code", "prose")
SPLIT_CHARS = 3000  # ~800 tokens: several 128-token samples per document, ~1,900 documents in all


def _code_files() -> List[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def domain_documents(domain: str) -> List[str]:
    """The raw documents of one domain, in a fixed order."""
    if domain == "code":
        return [p.read_text(encoding="utf-8", errors="replace") for p in _code_files()]
    if domain == "prose":
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    raise ValueError(f"unknown embedded domain {domain!r}; choose from {', '.join(DOMAINS)}")


def _description(tokenizer_digest: str) -> dict:
    files = [(p.name, p.stat().st_size) for p in _code_files()]
    return {"python": sys.version, "code_files": files, "tokenizer": tokenizer_digest, "split_chars": SPLIT_CHARS}


def _build(directory: Path, tokenizer_dir: Optional[str]) -> None:
    for domain in DOMAINS:
        source = directory / f"{domain}.jsonl"
        with open(source, "w") as f:
            for text in domain_documents(domain):
                f.write(json.dumps({"text": text}) + "\n")
        options = PreprocessOptions(tokenizer=tokenizer_dir, split_chars=SPLIT_CHARS, progress=False)
        stats = preprocess([str(source)], str(directory / domain), options)
        source.unlink()
        log.info("embedded corpus, %s: %s", domain, stats.summary())


def ensure_embedded_corpus(root: Path, tokenizer_dir: Optional[str] = None) -> Dict[str, str]:
    """Builds the corpus under ``root`` unless cached; returns domain -> indexed-dataset prefix."""
    key = content_key(_description(load_tokenizer(tokenizer_dir).digest))
    directory = build_once(root / "embedded" / key, lambda tmp: _build(tmp, tokenizer_dir))
    return {domain: str(directory / domain) for domain in DOMAINS}
