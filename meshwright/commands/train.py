"""`meshwright train`: train a model."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "train", "Train a model")
