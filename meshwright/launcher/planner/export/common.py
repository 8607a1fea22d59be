"""What every export shares: the one strategy the consumer gets (they take one for all layers), the
notes on what it cannot express, the optimizer settings taken from a TrainConfig and the training dtype
the plan was predicted in (``plan --dtype``; each target writes it in its own keys)."""

from __future__ import annotations

import dataclasses
from collections import Counter
from typing import Any, Optional

from meshwright.config import TrainConfig
from meshwright.errors import invalid
from meshwright.plan import LayerStrategy, Plan

# the training dtypes a plan is predicted in (Hardware.compute_dtype, ``plan --dtype``): bf16 = each stack's mixed
# precision (its Stack.precision), fp32 = fp32 throughout (PRECISIONS["fp32"])
DTYPES = ("bf16", "fp32")

_FIELDS = ("tp", "sp", "dp", "zero", "dp_shard", "recompute", "ep")


def _runs(values: list[str]) -> str:
    """'0-9: x, 10-79: y' for per-layer values (readable in a one-line note)."""
    out, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            out.append(f"{start}-{i - 1}: {values[start]}" if i - 1 > start else f"{start}: {values[start]}")
            start = i
    return ", ".join(out)


def _uniform(plan: Plan, notes: list[str], cfg: Any = None) -> LayerStrategy:
    """The strategy the export writes: the most common value of each field over the layers (MoE layers
    decide ``ep``). A note names every field whose layers differ, with the layer ranges, so nothing is
    collapsed silently."""
    strategies = plan.layer_strategies()
    chosen: dict[str, Any] = {}
    for name in _FIELDS:
        per_layer = [getattr(s, name) for s in strategies]
        if name == "ep" and cfg is not None and cfg.n_experts:
            per_layer = [s.ep for i, s in enumerate(strategies) if cfg.is_moe_layer(i)] or [1]
        value = Counter(per_layer).most_common(1)[0][0]
        chosen[name] = value
        if len({str(v) for v in per_layer}) > 1:
            notes.append(f"layers differ in {name} ({_runs([str(getattr(s, name)) for s in strategies])}); "
                         f"this stack takes one value for all layers: exported {name}={value}")
    savers = {(s.savers.fp8_act, s.savers.wta_crs, s.savers.lemo) for s in strategies}
    if any(any(v) for v in savers):
        notes.append("meshwright memory savers (COAT FP8 activations, WTA-CRS, LeMo) have no equivalent here: dropped, "
                     "so activation memory will exceed the plan's prediction")
    first = strategies[0]
    s = dataclasses.replace(first, **chosen)
    if s.dp_shard is not None and not (s.zero >= 2 and 1 < s.dp_shard < s.dp and s.dp % s.dp_shard == 0):
        s = dataclasses.replace(s, dp_shard=None)
    if s.sp and s.tp == 1:
        s = dataclasses.replace(s, sp=False)
    return s


def model_code_note(cfg: Any, notes: list[str], stack: str, where: str) -> None:
    """A note for the stacks whose export carries no model definition (DeepSpeed: the user's model code; torchtitan:
    the recipe's model): with Gemma's fields the model there must compute them, which the export cannot check."""
    fields = cfg.gemma_fields() if cfg is not None else []
    if fields:
        notes.append(f"{stack} takes the model from {where}: it must compute Gemma's {', '.join(fields)} as this model "
                     f"does (this export sets parallelism and training only)")


def stage_sizes(plan: Plan, n_layers: int) -> list[int]:
    """Transformer blocks per (virtual) pipeline stage, in stage order (stage j sits on rank j % pp)."""
    return [b - a for a, b in plan.stage_ranges(n_layers)]


def optimizer_settings(train: Optional[TrainConfig], notes: list[str], stack: str) -> Optional[TrainConfig]:
    """The TrainConfig whose lr/betas/eps/weight decay/clipping the export writes, or None with a note."""
    if train is None:
        notes.append(f"no train config given (--train-config): {stack} optimizer and schedule settings are left "
                     "to your launch script")
    return train


def check_dtype(dtype: str) -> str:
    """``dtype`` if an export can write it, else a one-line ConfigError naming the valid ones."""
    if dtype not in DTYPES:
        raise invalid("dtype", dtype, " or ".join(DTYPES))
    return dtype
