"""`meshwright profile`: profile the hardware and the model."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "profile", "Profile the hardware and the model")
