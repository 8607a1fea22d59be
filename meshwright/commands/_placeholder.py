"""Shared stand-in for subcommands whose issue has not landed yet."""

from __future__ import annotations

import argparse
import sys


def register_placeholder(sub: argparse._SubParsersAction, name: str, summary: str) -> None:
    p = sub.add_parser(name, help=f"{summary} (not yet available)", description=f"{summary}. Not yet available.")
    p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)

    def run(args: argparse.Namespace) -> int:
        print(f"meshwright {name}: not yet available in this version", file=sys.stderr)
        return 2

    p.set_defaults(func=run)
