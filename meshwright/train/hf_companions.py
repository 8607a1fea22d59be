"""The files a Hugging Face model directory carries besides its weights, kept from a run's sources to its export.

A fine-tuned model is used through transformers: ``AutoTokenizer.from_pretrained(OUT)`` needs the tokenizer files,
and ``generate`` stops at ``eos_token_id`` (config.json, generation_config.json). An export of config.json + weights
alone gave a directory with no tokenizer and ``eos_token_id: null``: generation never stopped. At the start of a run
the tokenizer the data was encoded with (``data.tokenizer``'s directory; a tokenizer file of another name as
``tokenizer.json``) and ``init_from``'s generation config and
token ids are copied into the run directory (``hf/``), so the export does not depend on those sources still being
there; ``meshwright export`` puts them beside the weights.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

COMPANIONS_DIR = "hf"
TOKEN_IDS_FILE = "token_ids.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
MODEL_FILES = ("generation_config.json",)
TOKEN_ID_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")


def _tokenizer_sources(tokenizer: Any) -> list[tuple[Path, str]]:
    """(file, name under ``hf/``) for the tokenizer of ``data.tokenizer``, resolved as the data's is
    (``tokenizer_file``): a ``tokenizer.json`` brings its directory's tokenizer files under their own names; a
    tokenizer file of another name is copied alone as ``tokenizer.json``, the name ``AutoTokenizer`` reads (its
    neighbours are not known to be its own: a ``tokenizer.json`` beside it is not the one the data was encoded with),
    when it parses as a Hugging Face tokenizers JSON, else with a one-line warning none is."""
    if not isinstance(tokenizer, str) or tokenizer in ("byte", "bpe"):
        return []
    from meshwright.data.tokenizer import _read_tokenizer_json, tokenizer_file
    from meshwright.errors import ConfigError

    try:
        file = tokenizer_file(tokenizer)
    except ConfigError:  # the data's own loading names it
        return []
    if file.name == "tokenizer.json":
        return [(file.parent / name, name) for name in TOKENIZER_FILES]
    try:
        _read_tokenizer_json(file, "data.tokenizer", tokenizer)
    except ConfigError as exc:
        print(f"warning: {exc}; the export will carry no tokenizer", file=sys.stderr, flush=True)
        return []
    return [(file, "tokenizer.json")]


def _same_tokenizer(a: Path, b: Path) -> bool:
    """Whether two tokenizer.json files are one tokenizer (``data prepare`` saves a re-serialised copy)."""
    from tokenizers import Tokenizer

    try:
        return bool(Tokenizer.from_file(str(a)).to_str() == Tokenizer.from_file(str(b)).to_str())
    except Exception:  # noqa: BLE001 - tokenizers raises a bare Exception on a file it cannot read
        return False


def _encoded_with(tok: list[tuple[Path, str]], data_dir: Path) -> tuple[list[tuple[Path, str]], int | None]:
    """(files, eos id) of the tokenizer the prepared ``data_dir`` was encoded with: ``data.tokenizer``'s files when
    they are that tokenizer (its tokenizer_config.json etc. come along), else the data's own tokenizer.json (a prepared
    directory does not read ``data.tokenizer``) and the end-of-document id its index names; none for byte data."""
    encoded = data_dir / "tokenizer.json"
    if not encoded.is_file():
        return [], None
    main = next((file for file, name in tok if name == "tokenizer.json"), None)
    if main is not None and _same_tokenizer(main, encoded):
        return tok, None
    try:
        eos = json.loads((data_dir / "index.json").read_text(encoding="utf-8"))["tokenizer"]["eos_id"]
    except (OSError, ValueError, KeyError, TypeError):
        eos = None
    return [(encoded, "tokenizer.json")], eos if isinstance(eos, int) and not isinstance(eos, bool) else None


def save_companions(cfg: Any, run_dir: str | Path, data_dir: str | Path | None = None) -> list[str]:
    """Copy the run's tokenizer files and ``init_from``'s generation config and token ids into ``run_dir/hf``
    (the names copied). ``data_dir``: the prepared directory the run reads (a mixture's first source: they share a
    tokenizer), whose tokenizer.json is the one its ids mean. Files are replaced only there, a directory the run
    creates."""
    dest = Path(run_dir) / COMPANIONS_DIR
    init = Path(cfg.init_from) if getattr(cfg, "init_from", None) else None
    # byte or bpe data: none (init_from's tokenizer is not the one the model was trained on)
    configured = _tokenizer_sources(getattr(cfg.data, "tokenizer", None))
    tok, data_eos = configured, None
    if data_dir is not None:  # data.path a prepared directory: encoded with its tokenizer.json, not data.tokenizer's
        tok, data_eos = _encoded_with(configured, Path(data_dir))
    sources = tok + ([(init / name, name) for name in MODEL_FILES] if init is not None else [])
    ids = _token_ids(init / "config.json") if init is not None else {}
    if data_eos is not None and "eos_token_id" not in ids:
        ids["eos_token_id"] = data_eos
    if tok and tok is configured and "eos_token_id" not in ids:  # data.tokenizer's end-of-document id, as the data's
        from meshwright.data.tokenizer import HFTokenizer
        from meshwright.errors import ConfigError

        with contextlib.suppress(ConfigError):  # none it can name: the export goes without, as before
            ids["eos_token_id"] = HFTokenizer.load(str(cfg.data.tokenizer)).eos_id
    if not sources and not ids:  # nothing to keep (or, on a resume, sources gone): what an earlier start kept stays
        return []
    remove_companions(Path(run_dir))  # this run's sources replace an earlier start's, none is mixed in
    dest.mkdir(parents=True, exist_ok=True)
    copied = []
    for file, name in sources:
        if file.is_file():
            tmp = dest / f".{name}.tmp"
            shutil.copyfile(file, tmp)
            tmp.replace(dest / name)
            copied.append(name)
    if ids:
        tmp = dest / f".{TOKEN_IDS_FILE}.tmp"
        tmp.write_text(json.dumps(ids) + "\n")
        tmp.replace(dest / TOKEN_IDS_FILE)
    return copied


def remove_companions(run_dir: Path) -> None:
    """Delete the files ``save_companions`` writes (and ``hf/`` once empty), nothing else (``--overwrite``)."""
    dest = run_dir / COMPANIONS_DIR
    if not dest.is_dir():
        return
    for name in (*TOKENIZER_FILES, *MODEL_FILES, TOKEN_IDS_FILE):
        for path in (dest / name, dest / f".{name}.tmp"):
            path.unlink(missing_ok=True)
    if not any(dest.iterdir()):
        dest.rmdir()


def _token_ids(config_json: Path) -> dict[str, Any]:
    """bos/eos/pad ids of a Hugging Face config.json (eos may be a list: Llama 3.1 Instruct stops at three)."""
    try:
        data = json.loads(config_json.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    out = {}
    for key in TOKEN_ID_KEYS:
        value = data.get(key)
        if isinstance(value, int) or (isinstance(value, list) and value and all(isinstance(v, int) for v in value)):
            out[key] = value
    return out


def companion_token_ids(run_dir: str | Path, vocab_size: int) -> dict[str, Any]:
    """The token ids ``init_from``'s config.json gave (those within ``vocab_size``), for the exported config.json."""
    ids = _token_ids(Path(run_dir) / COMPANIONS_DIR / TOKEN_IDS_FILE)
    return {k: v for k, v in ids.items() if all(0 <= i < vocab_size for i in (v if isinstance(v, list) else [v]))}


def export_companions(run_dir: str | Path, out: str | Path, earlier_export: bool) -> list[str]:
    """Put the run's saved tokenizer and generation files beside an export in ``out`` (the names written). A file
    ``out`` already holds is replaced only when ``out`` is an earlier export; otherwise it is left alone with a
    note (never delete what the export did not write)."""
    src = Path(run_dir) / COMPANIONS_DIR
    written: list[str] = []
    if not src.is_dir():
        return written
    for name in (*TOKENIZER_FILES, *MODEL_FILES):
        if not (src / name).is_file():
            continue
        target = Path(out) / name
        if target.exists() and not earlier_export:
            print(f"note: --hf {out} already holds {name}, not written by an export: left alone (the run's copy is "
                  f"{src / name})", file=sys.stderr, flush=True)
            continue
        tmp = Path(out) / f".{name}.tmp"
        shutil.copyfile(src / name, tmp)
        tmp.replace(target)
        written.append(name)
    return written
