"""``python -m meshwright``: the same command as ``meshwright``."""

from meshwright.cli import run

run()
