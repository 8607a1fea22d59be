"""`meshwright plan`: search the fastest parallel layout for a model and cluster."""

from __future__ import annotations

from meshwright.commands._placeholder import register_placeholder


def register(sub) -> None:
    register_placeholder(sub, "plan", "Search the fastest parallel layout for a model and cluster")
