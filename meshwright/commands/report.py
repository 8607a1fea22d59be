"""`meshwright report`: write an HTML/Markdown report of a run."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "report", "Write an HTML/Markdown report of a run")
