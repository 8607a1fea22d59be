"""The ``meshwright`` command. Each subcommand lives in ``meshwright/commands/<name>.py`` and exposes
``register(subparsers)``; this module only wires them together and turns user errors into one line."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from meshwright import __version__
from meshwright.errors import ConfigError, PeerLost, first_line

COMMANDS = ("data", "train", "profile", "plan", "launch", "report", "export", "completion")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshwright",
        description="Plan and run hybrid data/tensor/pipeline/expert-parallel training of transformers.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"meshwright.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:  # the subcommands' imports (torch) take seconds: a Ctrl-C then is the user's, not a traceback
        parser = build_parser()
    except KeyboardInterrupt:
        print("meshwright: interrupted", file=sys.stderr)
        return 130
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ConfigError as exc:
        print(f"meshwright {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError, PermissionError) as exc:
        # a path the command was given cannot be read or written: one line, not a traceback
        where = exc.filename if exc.filename is not None else "?"
        print(f"meshwright {args.command}: error: path={str(where)!r} is unusable ({exc.strerror or exc}); valid: an "
              f"existing, readable input or a writable output location", file=sys.stderr)
        return 2
    except PeerLost as exc:
        print(f"meshwright {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError) as exc:
        if not _out_of_memory(exc):
            raise
        first = first_line(exc, 200)
        advice = OOM_ADVICE.get(args.command, OOM_ADVICE["train"])
        print(f"meshwright {args.command}: error: out of memory ({first}); valid: {advice}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"meshwright {args.command}: interrupted{_which_rank()}", file=sys.stderr)
        return 130


def _reader_gone() -> int:
    """stdout's reader closed the pipe (``meshwright plan ... | head``): what is left unsaid goes nowhere and the exit
    is 141 (128 + SIGPIPE), as a shell reports for ``cat`` or ``grep`` in that place; it was a BrokenPipeError
    traceback. Files the command wrote (--out) are complete before it prints."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())  # the interpreter's own flush at exit must not fail again
    os.close(devnull)
    return 141


def _which_rank() -> str:
    """`` (rank R of W)`` under torchrun with several ranks, where each rank says it once; else empty."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""


# what to change after an out-of-memory error, per command (profile's sizes are flags, not the train config's)
OOM_ADVICE = {
    "train": "a smaller micro_batch or seq_len, recompute/loss_chunk_tokens, or a layout over more devices (`meshwright plan`)",
    "profile": "smaller --sizes (hardware) or --batch-sizes/--seq-lens (model)",
}


def _out_of_memory(exc: BaseException) -> bool:
    """torch.OutOfMemoryError (CUDA), the CPU allocator's failure, or Python's MemoryError: matched by name so
    that `meshwright --help` never imports torch."""
    return (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "DefaultCPUAllocator: can't allocate memory" in str(exc))


def run() -> None:
    """Entry point of ``python -m meshwright`` and ``python -m meshwright.cli`` (torchrun workers)."""
    try:
        code = main()
        sys.stdout.flush()  # here, not at exit, where a reader gone away (`| head`) is "Exception ignored" lines
    except BrokenPipeError:
        code = _reader_gone()
    ckpt = sys.modules.get("meshwright.train.async_checkpoint")  # loaded only by a run that trained
    abandoned = ckpt is not None and ckpt.abandoned_write_running()
    if "TORCHELASTIC_RUN_ID" in os.environ or abandoned:  # a torchrun worker, or a write given up: see exit_worker
        from meshwright.parallel.mesh import exit_worker  # keeps `meshwright --help` free of torch.distributed

        exit_worker(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
