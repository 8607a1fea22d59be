"""`meshwright data prepare INPUTS... --out DIR`: tokenize text into a memory-mapped token file + index."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("data", help="prepare text corpora into token files",
                       description="Data preparation. `meshwright data prepare --help` for details.")
    dsub = p.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    dsub.required = True
    prep = dsub.add_parser(
        "prepare", help="tokenize txt/md/py/jsonl files or directories into DIR",
        description="Tokenize text into DIR/tokens.bin (uint16/uint32, memory-mapped) and DIR/index.json "
                    "(document offsets). Use the result as `data.path=DIR` in a train config. "
                    "`meshwright data prepare --default` builds the embedded standard-library corpus into the cache.",
    )
    prep.add_argument("inputs", nargs="*", metavar="INPUT", help="files (.txt .md .py .jsonl) or directories")
    prep.add_argument("--out", metavar="DIR", help="output directory (replaced atomically)")
    prep.add_argument("--tokenizer", default="byte", metavar="byte|bpe|PATH",
                      help="byte-level (default), BPE trained on the inputs, or a pretrained model's tokenizer.json "
                           "(needs `tokenizers`)")
    prep.add_argument("--format", default="text", choices=["text", "instruct"],
                      help="text documents (default) or prompt/response / chat jsonl with the loss on responses only")
    prep.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 4096)")
    prep.add_argument("--text-key", default="text", help="field holding the text in .jsonl lines (default 'text')")
    prep.add_argument("--default", action="store_true", help="build the embedded default corpus (stdlib sources) into the cache")
    prep.add_argument("--max-files", type=int, default=None, help="with --default: files to sample (default 400)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=_prepare)


@contextlib.contextmanager
def _sigterm_cleans_up() -> Iterator[None]:
    """SIGTERM (a scheduler's stop, `timeout`) ends the command as Ctrl-C does: the temp directory being written is
    removed. Its default action killed the process and left the hidden ``.OUT.tmp-*`` beside --out for good."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, frame: Any) -> None:
        print("meshwright data: terminated (SIGTERM); nothing written", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _prepare(args: argparse.Namespace) -> int:
    with _sigterm_cleans_up():
        return _prepare_data(args)


def _prepare_data(args: argparse.Namespace) -> int:
    from meshwright.data.prepare import prepare, prepare_default_corpus
    from meshwright.errors import ConfigError, invalid

    if args.max_files is not None and args.max_files <= 0:
        raise invalid("--max-files", args.max_files, "a positive integer")
    if args.vocab_size is not None and args.tokenizer != "bpe":  # was ignored silently: byte/tokenizer.json fix it
        raise invalid("--vocab-size", args.vocab_size, "used only with --tokenizer bpe (byte has 256 ids; a "
                      "tokenizer.json brings its own vocabulary)")
    args.vocab_size = 4096 if args.vocab_size is None else args.vocab_size
    if args.default:
        if args.inputs or args.out:
            raise ConfigError("--default takes no INPUTS or --out; valid: `meshwright data prepare --default` or `... INPUTS --out DIR`")
        out = prepare_default_corpus(400 if args.max_files is None else args.max_files, args.tokenizer, args.vocab_size,
                                     progress=not args.no_progress)
    else:
        if not args.inputs:
            raise invalid("inputs", [], "one or more files or directories (or --default)")
        if args.max_files is not None:  # it samples the embedded corpus only; on INPUTS it was ignored silently
            raise invalid("--max-files", args.max_files, "used only with --default (every INPUT file is tokenized)")
        if not args.out:
            raise invalid("--out", None, "an output directory")
        out = prepare(args.inputs, args.out, args.tokenizer, args.vocab_size, args.text_key,
                      progress=not args.no_progress, fmt=args.format)
    index = json.loads((out / "index.json").read_text())
    print(f"prepared {out}: {index['num_tokens']:,} tokens ({index['dtype']}), {index['num_documents']} documents, "
          f"tokenizer {index['tokenizer']['name']} (vocab {index['tokenizer']['vocab_size']})")
    return 0
