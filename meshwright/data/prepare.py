"""``meshwright data prepare``: text files -> one memory-mapped token file plus a JSON index.

Layout of a prepared directory (written atomically: built in a sibling temp dir, then renamed)::

    tokens.bin      uint16 (vocab <= 65536) or uint32 token ids, little-endian, documents back to back,
                    each followed by the tokenizer's end-of-document id
    index.json      tokenizer, dtype, num_tokens, num_documents, max_token_id, sources, doc_offsets_file
    doc_offsets.bin int64, D+1 token offsets (document k is tokens[off[k]:off[k+1]]); a binary file, not a JSON
                    list in index.json (version 1, still read): ten million documents were 120 MB of JSON and
                    0.5 GB of Python integers on every rank
    tokenizer.json  only for BPE and Hugging Face tokenizers
    mask.bin        only for instruction/chat data: uint8, 1 where the token is a loss target (responses)

Inputs may be .txt/.md/.py files (one document each), .jsonl files (one document per line, text under
``text_key``) or directories (searched recursively for those suffixes, sorted). With ``format='instruct'``
the .jsonl lines are prompt/response or chat examples (``meshwright.data.instruct``) and the loss is
masked to the responses. ``tokenizer`` is byte, bpe or the path of a pretrained model's tokenizer.json.
"""

from __future__ import annotations

import hashlib
import json
from array import array
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
from tqdm import tqdm

from meshwright.data.corpus import stdlib_files, stdlib_root
from meshwright.data.instruct import encode_example, iter_examples
from meshwright.data.jsonl import iter_jsonl
from meshwright.data.tokenizer import TOKENIZERS, BPETokenizer, ByteTokenizer, HFTokenizer, tokenizer_file
from meshwright.errors import ConfigError, invalid
from meshwright.tools.cache import cache_root

SUFFIXES = (".txt", ".md", ".py", ".jsonl")
FORMATS = ("text", "instruct")
INDEX_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: doc_offsets as a JSON list in index.json
DOC_OFFSETS = "doc_offsets.bin"


def collect_inputs(inputs: list[str | Path]) -> list[Path]:
    """Files named directly plus matching files under named directories, in a deterministic order."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
            if not found:
                raise invalid("inputs", str(p), f"a directory holding {', '.join(SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise invalid("inputs", str(p), f"a file ending in {', '.join(SUFFIXES)} or a directory")
            files.append(p)
        else:
            raise invalid("inputs", str(p), "an existing file or directory")
    if not files:
        raise invalid("inputs", [str(i) for i in inputs], "at least one text file or directory")
    return files


def iter_documents(files: list[Path], text_key: str = "text") -> Iterator[tuple[Path, str]]:
    """(source, text) for every document; a .jsonl file holds one JSON object per line."""
    for path in files:
        if path.suffix == ".jsonl":
            for lineno, obj in iter_jsonl(path, errors="replace"):
                if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
                    raise ConfigError(f"{path}:{lineno} has no string field {text_key!r}; valid: objects like {{\"{text_key}\": \"...\"}} (see --text-key)")
                yield path, obj[text_key]
        else:
            yield path, path.read_text(encoding="utf-8", errors="replace")


def atomic_directory(final: Path, build: Callable[[Path], None], keep_existing: bool = False) -> Path:
    """Run ``build(tmp)`` in a sibling temp dir, then rename it to ``final``.

    Readers never see a half-written directory. With ``keep_existing`` a concurrent builder that lost
    the race (another process renamed first) discards its copy, which makes cache filling safe.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        build(tmp)
        if final.exists():
            if keep_existing:
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.replace(tmp, final)
            except OSError:  # another process created it meanwhile
                if not keep_existing:
                    raise
                shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<u4")


def _write(tmp: Path, files: list[Path], tokenizer: str, vocab_size: int, text_key: str, progress: bool,
           fmt: str = "text") -> None:
    if fmt == "instruct":
        return _write_instruct(tmp, files, HFTokenizer.load(tokenizer) if tokenizer not in TOKENIZERS else ByteTokenizer(),
                               progress)
    if tokenizer == "bpe":
        tok = BPETokenizer.train((t for _, t in iter_documents(files, text_key)), vocab_size)
        tok.save(tmp / "tokenizer.json")
        encode = lambda text: np.asarray(tok.encode(text), dtype=np.int64)  # noqa: E731
    elif tokenizer not in TOKENIZERS:
        tok = HFTokenizer.load(tokenizer)
        tok.save(tmp / "tokenizer.json")
        encode = lambda text: np.asarray(tok.encode(text), dtype=np.int64)  # noqa: E731
    else:
        tok = ByteTokenizer()
        encode = lambda text: np.frombuffer(tok.encode_bytes(text), dtype=np.uint8)  # noqa: E731
    dtype = _token_dtype(tok.vocab_size)
    offsets = array("q", [0])
    sources: list[dict] = []
    eos = np.asarray([tok.eos_id], dtype=dtype)
    top = -1  # the largest id written: index.json's max_token_id, so a run need not read every token to check it
    with (tmp / "tokens.bin").open("wb") as fh:
        bar = tqdm(iter_documents(files, text_key), desc="tokenize", unit="doc", disable=not progress, file=sys.stderr)
        for path, text in bar:
            ids = encode(text).astype(dtype)
            fh.write(ids.tobytes())
            fh.write(eos.tobytes())
            top = max(top, int(ids.max()) if len(ids) else -1, tok.eos_id)
            offsets.append(offsets[-1] + len(ids) + 1)
            if not sources or sources[-1]["path"] != str(path):
                sources.append({"path": str(path), "documents": 0})
            sources[-1]["documents"] += 1
    _write_index(tmp, {"tokenizer": tok.to_json(), "dtype": dtype.name, "sources": sources, "max_token_id": top}, offsets)


def _write_index(tmp: Path, fields: dict[str, Any], offsets: array) -> None:
    """doc_offsets.bin and index.json (``fields`` plus the version, token and document counts)."""
    with (tmp / DOC_OFFSETS).open("wb") as fh:
        offsets.tofile(fh)  # array("q"): int64, native order (little-endian on every platform torch runs on)
    index = {"version": INDEX_VERSION, "num_tokens": offsets[-1], "num_documents": len(offsets) - 1,
             "doc_offsets_file": DOC_OFFSETS, **fields}
    (tmp / "index.json").write_text(json.dumps(index))


# every name _write and _write_instruct put in a prepared directory
PREPARED_FILES = frozenset({"index.json", "tokens.bin", "mask.bin", "tokenizer.json", DOC_OFFSETS})


def is_prepared_dir(path: Path) -> bool:
    """True for a directory this module wrote: index.json with our version and offsets, and tokens.bin."""
    try:
        index = json.loads((path / "index.json").read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return False
    return (isinstance(index, dict) and index.get("version") in READABLE_VERSIONS
            and ("doc_offsets" in index or "doc_offsets_file" in index) and (path / "tokens.bin").is_file())


def check_out_dir(out: Path, inputs: list[str | Path]) -> None:
    """``--out`` may only name a new path, an empty directory or a prepared data set: replacing it must never
    delete an unrelated directory, a file, or the inputs themselves."""
    resolved = out.resolve()
    if str(out) in (".", "") or resolved == Path.cwd().resolve() or resolved == Path(resolved.anchor):
        raise invalid("--out", str(out), "a new directory for the prepared data (not the current or root directory)")
    for item in inputs:
        src = Path(item).resolve()
        if src == resolved or resolved in src.parents:
            raise invalid("--out", str(out), f"a directory outside the inputs (it holds input {item}, which "
                          f"replacing it would delete)")
    if not out.exists():
        return
    if not out.is_dir():
        raise invalid("--out", str(out), "a new or prepared data directory (this path is a file; it is left alone)")
    if any(out.iterdir()) and not is_prepared_dir(out):
        raise invalid("--out", str(out), "a new, empty or previously prepared data directory (this one holds other "
                      "files, which would be deleted; it is left alone)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in PREPARED_FILES)
    if foreign:  # the whole directory is replaced: a file the user added to a prepared set went with it
        raise invalid("--out", str(out), f"a prepared data directory holding only what `data prepare` writes (this one "
                      f"also holds {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, which replacing it "
                      f"would delete; it is left alone)")


def check_writable_parent(out: Path) -> None:
    """The directory ``out`` is built beside must be creatable and writable: said before any input is tokenized."""
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.probe-", dir=out.parent))
    except OSError as exc:
        raise invalid("--out", str(out), f"a path in a writable directory ({exc.strerror or exc})") from None


def _write_instruct(tmp: Path, files: list[Path], tok: Any, progress: bool) -> None:
    """tokens.bin + mask.bin + index.json for prompt/response or chat jsonl files."""
    if tok.name == "hf":
        tok.save(tmp / "tokenizer.json")
    dtype = _token_dtype(tok.vocab_size)
    offsets, sources, trained, top = array("q", [0]), [], 0, -1
    with (tmp / "tokens.bin").open("wb") as fh, (tmp / "mask.bin").open("wb") as mh:
        for path in tqdm(files, desc="tokenize", unit="file", disable=not progress, file=sys.stderr):
            if path.suffix != ".jsonl":
                raise invalid("inputs", str(path), "a .jsonl file of prompt/response or messages lines (format instruct)")
            n = 0
            for segments in iter_examples(path):
                ids, mask = encode_example(segments, tok)
                ids = ids.astype(dtype)
                fh.write(ids.tobytes())
                top = max(top, int(ids.max()) if len(ids) else -1)
                mh.write(mask.tobytes())
                offsets.append(offsets[-1] + len(ids))
                trained += int(mask.sum())
                n += 1
            sources.append({"path": str(path), "documents": n})
    _write_index(tmp, {"tokenizer": tok.to_json(), "dtype": dtype.name, "sources": sources, "loss_mask": "mask.bin",
                       "trained_tokens": trained, "max_token_id": top}, offsets)


def check_tokenizer(tokenizer: str, key: str = "tokenizer") -> str:
    """byte, bpe, or an existing tokenizer.json (a model directory holding one is accepted)."""
    if tokenizer in TOKENIZERS:
        return tokenizer
    try:
        return str(tokenizer_file(tokenizer))
    except ConfigError:
        raise invalid(key, tokenizer, "byte, bpe, or the path of a Hugging Face tokenizer.json") from None


def prepare(inputs: list[str | Path], out: str | Path, tokenizer: str = "byte", vocab_size: int = 4096,
            text_key: str = "text", progress: bool = True, fmt: str = "text") -> Path:
    """Tokenize ``inputs`` into ``out`` (replaced atomically if it is a prepared data set). Returns ``out``."""
    tokenizer = check_tokenizer(tokenizer)
    if fmt not in FORMATS:
        raise invalid("format", fmt, " or ".join(FORMATS))
    if fmt == "instruct" and tokenizer == "bpe":
        raise invalid("tokenizer", tokenizer, "byte or a tokenizer.json path for instruction data")
    check_out_dir(Path(out), inputs)
    check_writable_parent(Path(out))
    files = collect_inputs(inputs)
    return atomic_directory(Path(out), lambda tmp: _write(tmp, files, tokenizer, vocab_size, text_key, progress, fmt))


def prepare_instruct_cached(path: str | Path, tokenizer: str, progress: bool = True,
                            cache: str | Path | None = None) -> Path:
    """``data.path: FILE.jsonl`` of instruction/chat examples, tokenized once into the cache."""
    path = Path(path)
    tokenizer = check_tokenizer(tokenizer, "data.tokenizer")
    tok_key = hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest() if tokenizer not in TOKENIZERS else tokenizer
    st = path.stat()
    key = hashlib.sha256(json.dumps({"v": INDEX_VERSION, "file": str(path.resolve()), "size": st.st_size,
                                     "mtime": st.st_mtime_ns, "tok": tok_key}).encode()).hexdigest()[:16]
    final = (Path(cache) if cache else cache_root(create=True)) / f"instruct-{path.stem}-{key}"
    if (final / "index.json").is_file():
        return final
    return atomic_directory(final, lambda tmp: _write(tmp, [path], tokenizer, 0, "text", progress, "instruct"),
                            keep_existing=True)


def prepare_default_corpus(max_files: int | None = 400, tokenizer: str = "byte", vocab_size: int = 4096,
                           progress: bool = True, cache: str | Path | None = None) -> Path:
    """Tokenize the standard-library corpus once into the cache; later calls reuse it.

    The cache key covers the Python version, the file list with sizes, the tokenizer and its vocabulary,
    so a different interpreter or setting gets its own directory.
    """
    tokenizer = check_tokenizer(tokenizer, "data.tokenizer")
    if max_files is not None and max_files <= 0:
        raise invalid("max_files", max_files, "a positive integer or null (all files)")
    files = stdlib_files(max_files)
    root = stdlib_root()
    tok_key = tokenizer if tokenizer in TOKENIZERS else hashlib.sha256(Path(tokenizer).read_bytes()).hexdigest()
    key_src = json.dumps({
        "v": INDEX_VERSION, "python": sys.version, "tokenizer": tok_key,
        "vocab": vocab_size if tokenizer == "bpe" else 256,
        "files": [[str(f.relative_to(root)), f.stat().st_size] for f in files],
    })
    key = hashlib.sha256(key_src.encode()).hexdigest()[:16]
    root = Path(cache) if cache else cache_root(create=True)
    final = root / f"stdlib-{tokenizer if tokenizer in TOKENIZERS else 'hf'}-{key}"
    if (final / "index.json").is_file():
        return final
    return atomic_directory(final, lambda tmp: _write(tmp, files, tokenizer, vocab_size, "text", progress),
                            keep_existing=True)
