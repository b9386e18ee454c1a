"""A small real-text corpus every Python installation carries, for the default job.

Three domains, each tokenized on first use into ``<cache root>/embedded/<key>/``:

- ``code``: the standard library's top-level ``*.py`` modules (about 4.7 MB, 1.1M tokens on
  CPython 3.11);
- ``prose``: the documentation topics of ``pydoc_data`` (the text behind ``help()``, about
  0.5 MB, 0.1M tokens), one document per topic;
- ``code_files``: the same modules as ``code``, one whole file per document (median ~5K, the
  longest ~60K tokens): the long-document domain of the long-context stage.

``code`` and ``prose`` documents are split at blank lines into pieces of about ``SPLIT_CHARS``
characters so that megatron's document-level train/valid/test split has enough documents in
each part. The cache key covers the domain, the Python version, the source files and the
tokenizer, so a different interpreter or tokenizer builds its own copy. Preparing a domain
takes a few seconds on 2 cores.
"""

from __future__ import annotations

import json
import logging
import sys
import sysconfig
from pathlib import Path
from typing import List, Optional

from megatron_qwen.data.cache import build_once, content_key
from megatron_qwen.data.preprocess import PreprocessOptions, preprocess
from megatron_qwen.data.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

SPLIT_CHARS = 3000  # ~800 tokens: several 128-token samples per document, ~1,900 documents in all
DOMAINS = {"code": SPLIT_CHARS, "prose": SPLIT_CHARS, "code_files": 0}  # domain -> split (0: whole documents)


def _code_files() -> List[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def domain_documents(domain: str) -> List[str]:
    """The raw documents of one domain, in a fixed order."""
    if domain in ("code", "code_files"):
        return [p.read_text(encoding="utf-8", errors="replace") for p in _code_files()]
    if domain == "prose":
        from pydoc_data.topics import topics

        return [topics[name] for name in sorted(topics)]
    raise ValueError(f"unknown embedded domain {domain!r}; choose from {', '.join(DOMAINS)}")


def _description(domain: str, tokenizer_digest: str) -> dict:
    files = [(p.name, p.stat().st_size) for p in _code_files()]
    return {"domain": domain, "python": sys.version, "code_files": files, "tokenizer": tokenizer_digest,
            "split_chars": DOMAINS[domain]}


def _build(directory: Path, domain: str, tokenizer_dir: Optional[str]) -> None:
    source = directory / f"{domain}.jsonl"
    with open(source, "w") as f:
        for text in domain_documents(domain):
            f.write(json.dumps({"text": text}) + "\n")
    options = PreprocessOptions(tokenizer=tokenizer_dir, split_chars=DOMAINS[domain], progress=False)
    stats = preprocess([str(source)], str(directory / domain), options)
    source.unlink()
    log.info("embedded corpus, %s: %s", domain, stats.summary())


def ensure_embedded_domain(root: Path, domain: str, tokenizer_dir: Optional[str] = None) -> str:
    """Builds one domain under ``root`` unless cached; returns its indexed-dataset prefix."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown embedded domain {domain!r}; choose from {', '.join(DOMAINS)}")
    key = content_key(_description(domain, load_tokenizer(tokenizer_dir).digest))
    directory = build_once(root / "embedded" / key, lambda tmp: _build(tmp, domain, tokenizer_dir))
    return str(directory / domain)
