"""`meshwright launch`: launch a training run on many hosts over SSH."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "launch", "Launch a training run on many hosts over SSH")
