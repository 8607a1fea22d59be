"""Translate a Plan into the settings of other stacks, so Megatron-LM, DeepSpeed and torchtitan users
benefit from the planner too. Where a stack cannot express part of a plan (per-layer strategies,
ZeRO levels it lacks) the export picks the nearest setting and says so in ``notes``."""

from __future__ import annotations

import json

from meshwright.config import ModelConfig
from meshwright.errors import invalid
from meshwright.launcher.planner.export.deepspeed import deepspeed_config
from meshwright.launcher.planner.export.megatron import megatron_args
from meshwright.launcher.planner.export.torchtitan import torchtitan_toml
from meshwright.plan import Plan

EMITTERS = ("megatron", "deepspeed", "torchtitan")


def emit(plan: Plan, cfg: ModelConfig, target: str) -> tuple[str, list[str]]:
    """Text for ``meshwright plan --emit TARGET`` and the notes on approximations."""
    if target == "megatron":
        args, notes = megatron_args(plan, cfg)
        return " ".join(args), notes
    if target == "deepspeed":
        conf, notes = deepspeed_config(plan, cfg)
        return json.dumps(conf, indent=2), notes
    if target == "torchtitan":
        return torchtitan_toml(plan, cfg)
    raise invalid("emit", target, ", ".join(EMITTERS))

__all__ = ["EMITTERS", "deepspeed_config", "emit", "megatron_args", "torchtitan_toml"]
