"""One exception type for user-facing mistakes, so the CLI can print one line instead of a traceback."""

from __future__ import annotations


class ConfigError(ValueError):
    """Bad user input: the message names the field, the value and what would be valid."""


def first_line(exc: BaseException, limit: int | None = None, default: str | None = None) -> str:
    """The first line of ``exc``'s message, cut to ``limit`` (``default``, else its type's name, when it has none): the
    part of a multi-line library error (torch, gloo, safetensors, tokenizers) that fits the one line we print."""
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__ if default is None else default)[:limit]


def invalid(field: str, value: object, valid: str) -> ConfigError:
    """Build the one-line error every validator in meshwright uses."""
    return ConfigError(f"{field}={value!r} is invalid; valid: {valid}")


class PeerLost(RuntimeError):
    """A multi-rank run stopped because another rank is gone or a collective timed out: not bad input (the CLI
    prints the one line and exits 1), but said as one line per rank, naming the checkpoint to resume from."""
