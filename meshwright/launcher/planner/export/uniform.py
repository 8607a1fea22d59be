"""One strategy for every layer: the layouts other stacks run, made from the per-layer plans the search returns.

The search picks a strategy per layer (Galvatron-style): recompute on some layers and not others, expert parallelism
of 4 on some MoE layers and 2 on others. Megatron-LM, DeepSpeed and torchtitan take one setting for the whole model,
so ``plan --emit X`` used to choose among the search's best plans the fastest one the stack runs as planned, and
when the best few all mixed strategies, that was a much slower plan further down (Mixtral 8x7B on 16 A100 for
Megatron-LM: a ZeRO-3 full-recompute plan at 1.71x the fastest, while making the fastest plans' layers agree costs
little). Here each plan's own strategies are tried on every layer (each with each MoE layers' expert-parallel degree)
and the variants that validate and fit are costed like any plan (``cost_model.evaluate_plan``)."""

from __future__ import annotations

import dataclasses
from typing import Any

from meshwright.errors import ConfigError
from meshwright.plan import LayerStrategy, Plan, validate_plan


def uniform_variants(plan: Plan, cfg: Any, hw: Any, world_size: int, cache: dict[Any, Any]) -> list[tuple[Plan, Any]]:
    """Every fitting ``(plan, prediction)`` with one strategy on every dense layer and the same one with one
    expert-parallel degree on every MoE layer, taken from ``plan``'s own strategies (none if ``plan`` is uniform)."""
    from meshwright.launcher.planner import cost_model as cm

    strategies = plan.layer_strategies()
    moe = [cfg.is_moe_layer(i) for i in range(len(strategies))]
    templates = {s.key(): s for s in strategies}.values()
    eps = sorted({s.ep for s, m in zip(strategies, moe) if m}) or [1]
    if len(templates) == 1 and len(eps) == 1:
        return []
    out, seen = [], set()
    for template in templates:
        for ep in eps:
            layers = [_with_ep(template, ep if m else 1) for m in moe]
            key = tuple(s.key() for s in layers)
            if key in seen:
                continue
            seen.add(key)
            variant = dataclasses.replace(plan, layers=Plan.compress(layers))
            try:
                validate_plan(variant, cfg, world_size)
            except ConfigError:  # an ep the template's dp cannot hold, say
                continue
            prediction = cm.evaluate_plan(variant, cfg, hw, world_size, cache)
            if prediction.fits:
                out.append((variant, prediction))
    return out


def _with_ep(s: LayerStrategy, ep: int) -> LayerStrategy:
    return s.with_repeat(1) if s.ep == ep else dataclasses.replace(s, ep=ep, repeat=1)
