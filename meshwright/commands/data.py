"""`meshwright data`: prepare a text corpus into a token file."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "data", "Prepare a text corpus into a token file")
