"""What every export shares: the per-layer strategy the consumer gets (they take one for all layers)."""

from __future__ import annotations

from typing import Any

from meshwright.plan import Plan


def _uniform(plan: Plan, notes: list[str]) -> Any:
    """The strategy of the first layer; note when layers differ (these stacks want one per model)."""
    strategies = plan.layer_strategies()
    first = strategies[0]
    for name in ("tp", "sp", "zero", "dp_shard", "recompute", "ep"):
        values = sorted({str(getattr(s, name)) for s in strategies})
        if len(values) > 1:
            notes.append(f"layers use {name} in {{{', '.join(values)}}}; exported {name}={getattr(first, name)} for all")
    return first
