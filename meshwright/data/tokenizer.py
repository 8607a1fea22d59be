"""Tokenizers: byte-level (always available, vocab 256) and an optional trained BPE (``tokenizers``).

The byte tokenizer uses byte 0 (NUL, absent from text files) as the end-of-document token, so the
vocabulary stays exactly 256 and matches the ``tiny`` model presets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

from meshwright.errors import ConfigError, invalid

TOKENIZERS = ("byte", "bpe")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Iterable[int]) -> str: ...

    def to_json(self) -> dict: ...


class ByteTokenizer:
    """UTF-8 bytes as tokens; NUL (0) marks the end of a document."""

    name = "byte"
    vocab_size = 256
    eos_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8", errors="replace").replace(b"\x00", b""))

    def encode_bytes(self, text: str) -> bytes:
        """Fast path for ``prepare``: the token ids as a bytes object."""
        return text.encode("utf-8", errors="replace").replace(b"\x00", b"")

    def decode(self, ids: Iterable[int]) -> str:
        return bytes(int(i) for i in ids if int(i) != self.eos_id).decode("utf-8", errors="replace")

    def to_json(self) -> dict:
        return {"name": "byte", "vocab_size": 256, "eos_id": 0}


def _require_tokenizers():
    try:
        import tokenizers  # noqa: F401
    except ImportError:
        raise ConfigError("tokenizer='bpe' is invalid here: the optional 'tokenizers' package is not installed; "
                          "valid: 'byte', or `pip install meshwright[bpe]`") from None
    return tokenizers


class BPETokenizer:
    """Byte-level BPE trained on the input corpus with Hugging Face ``tokenizers`` (optional)."""

    name = "bpe"
    EOS = "<|endoftext|>"

    def __init__(self, tok) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.eos_id = tok.token_to_id(self.EOS)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "BPETokenizer":
        tk = _require_tokenizers()
        if vocab_size < 512:
            raise invalid("vocab_size", vocab_size, "at least 512 for a BPE tokenizer")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOS],
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        tk = _require_tokenizers()
        return cls(tk.Tokenizer.from_file(str(path)))

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        return {"name": "bpe", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "file": "tokenizer.json"}


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared data directory was built with (from its ``index.json``)."""
    d = Path(data_dir)
    meta = json.loads((d / "index.json").read_text())["tokenizer"]
    if meta["name"] == "byte":
        return ByteTokenizer()
    return BPETokenizer.load(d / meta.get("file", "tokenizer.json"))
