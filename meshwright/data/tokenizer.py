"""Tokenizers: byte-level (always available, vocab 256), an optional trained BPE (``tokenizers``) and a
pretrained model's own Hugging Face ``tokenizer.json`` (``data.tokenizer: PATH``, for fine-tuning).

The byte tokenizer uses byte 0 (NUL, absent from text files) as the end-of-document token, so the
vocabulary stays exactly 256 and matches the ``tiny`` model presets.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Protocol

from meshwright.errors import ConfigError, first_line, invalid

TOKENIZERS = ("byte", "bpe")  # ... or the path of a Hugging Face tokenizer.json
MAX_BPE_VOCAB = 2**20  # far above any real vocabulary (Llama 3: 128k, Gemma: 256k)


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


def _read_tokenizer_json(path: Path, field: str, ref: str):
    """``tokenizers.Tokenizer.from_file``, whose Rust parser raises a bare ``Exception`` for an empty, truncated or
    non-tokenizer JSON file: one line naming the field instead of that traceback."""
    tk = _require_tokenizers()
    try:
        return tk.Tokenizer.from_file(str(path))
    except Exception as exc:  # noqa: BLE001 - tokenizers raises Exception itself, nothing narrower
        raise invalid(field, ref, f"a Hugging Face tokenizer.json ({path} does not parse as one: {first_line(exc, 160)})") from None


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
        if not 512 <= vocab_size <= MAX_BPE_VOCAB:  # a huge size aborted the process inside the Rust trainer
            raise invalid("vocab_size", vocab_size, f"an integer in [512, {MAX_BPE_VOCAB:,}] for a BPE tokenizer")
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[cls.EOS],
                                         initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path: str | Path) -> "BPETokenizer":
        return cls(_read_tokenizer_json(Path(path), "data.tokenizer", str(path)))

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


EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<|im_end|>", "<eos>", "<|eot_id|>")


def tokenizer_file(ref: str | Path) -> Path:
    """``ref`` as a ``tokenizer.json`` path (a model directory holding one is accepted too)."""
    p = Path(ref)
    if p.is_dir():
        p = p / "tokenizer.json"
    if not p.is_file():
        raise invalid("data.tokenizer", str(ref), "byte, bpe, or the path of a Hugging Face tokenizer.json "
                      "(or of a model directory holding one)")
    return p


class HFTokenizer:
    """A pretrained model's ``tokenizer.json`` (Hugging Face ``tokenizers``); no special tokens are added,
    the end-of-document id is the ``eos_token`` of a neighbouring ``tokenizer_config.json`` or a usual name."""

    name = "hf"

    def __init__(self, tok, eos_id: int) -> None:
        self._tok = tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.eos_id = eos_id

    @classmethod
    def load(cls, path: str | Path) -> "HFTokenizer":
        file = tokenizer_file(path)
        tok = _read_tokenizer_json(file, "data.tokenizer", str(path))
        names: list[str] = []
        config = file.with_name("tokenizer_config.json")
        if config.is_file():
            try:
                settings = json.loads(config.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError is a ValueError
                raise invalid("data.tokenizer", str(path), f"a model directory whose tokenizer_config.json is a JSON "
                              f"object ({config} is not valid JSON: {str(exc)[:120]})") from None
            if not isinstance(settings, dict):
                raise invalid("data.tokenizer", str(path), f"a model directory whose tokenizer_config.json is a JSON "
                              f"object ({config} holds {type(settings).__name__})")
            eos = settings.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if isinstance(eos, str):
                names.append(eos)
        for name in [*names, *EOS_CANDIDATES]:
            eos_id = tok.token_to_id(name)
            if eos_id is not None:
                return cls(tok, eos_id)
        raise invalid("data.tokenizer", str(path), f"a tokenizer with an end-of-text token ({', '.join(EOS_CANDIDATES)}) "
                      "or a tokenizer_config.json naming eos_token")

    def save(self, path: str | Path) -> None:
        self._tok.save(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def to_json(self) -> dict:
        return {"name": "hf", "vocab_size": self.vocab_size, "eos_id": self.eos_id, "file": "tokenizer.json"}


def make_tokenizer(ref: str) -> Tokenizer:
    """``byte`` or a tokenizer.json path (``bpe`` is trained from the data, in ``prepare``)."""
    if ref == "byte":
        return ByteTokenizer()
    if ref == "bpe":
        raise invalid("tokenizer", ref, "byte or a tokenizer.json path here (bpe is trained by `meshwright data prepare`)")
    return HFTokenizer.load(ref)


def load_tokenizer(data_dir: str | Path) -> Tokenizer:
    """The tokenizer a prepared data directory was built with (from its ``index.json``)."""
    d = Path(data_dir)
    meta = json.loads((d / "index.json").read_text())["tokenizer"]
    if meta["name"] == "byte":
        return ByteTokenizer()
    if meta["name"] == "hf":
        return HFTokenizer(_read_tokenizer_json(d / meta.get("file", "tokenizer.json"), "data.path", str(d)),
                           int(meta["eos_id"]))
    return BPETokenizer.load(d / meta.get("file", "tokenizer.json"))
