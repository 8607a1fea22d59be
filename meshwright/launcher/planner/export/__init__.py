"""Translate a Plan into the settings of other stacks, so Megatron-LM, DeepSpeed and torchtitan users
benefit from the planner too. Each export names the consumer version it targets (``stacks.TARGETS``);
where a stack cannot express part of a plan (per-layer strategies, ZeRO levels it lacks, memory savers)
the export picks the nearest setting and says so in ``notes``; ``stacks.stack_constraints`` restricts
the search to what the stack runs."""

from __future__ import annotations

import json
import shlex
from typing import Optional

from meshwright.config import ModelConfig, TrainConfig
from meshwright.errors import invalid
from meshwright.launcher.planner.export.common import DTYPES
from meshwright.launcher.planner.export.deepspeed import deepspeed_config
from meshwright.launcher.planner.export.megatron import megatron_args, megatron_env, rope_and_window_args
from meshwright.launcher.planner.export.stacks import TARGETS, stack_constraints, stack_problems
from meshwright.launcher.planner.export.torchtitan import torchtitan_config, torchtitan_settings, torchtitan_toml
from meshwright.launcher.planner.export.torchtitan_model import torchtitan_model
from meshwright.plan import Plan

EMITTERS = tuple(TARGETS)


def check_emit_model(target: str, cfg: ModelConfig) -> None:
    """A one-line ConfigError, before any search, for a model ``target`` cannot be (torchtitan: a sliding window,
    longrope, partial rotary or GPT-2 blocks; Megatron-LM: a rope scaling it has no flags for), so ``plan --emit``
    does not search for an export it will refuse."""
    if target == "torchtitan":
        torchtitan_model(cfg)
    elif target == "megatron" and cfg.arch == "llama":
        cfg.refuse_gemma("the Megatron-LM export (pretrain_gpt.py's arguments have no flag for them)")
        rope_and_window_args(cfg)


def emit(plan: Plan, cfg: ModelConfig, target: str, train: Optional[TrainConfig] = None,
         stack: Optional[str] = None, dtype: str = "bf16") -> tuple[str, list[str]]:
    """Text for ``meshwright plan --emit TARGET`` and the notes (the first names the targeted version); ``stack``:
    which of the target's stacks (``deepspeed-fp32-accum`` with deepspeed), by default the target's own; ``dtype``:
    the training dtype the plan was predicted in (bf16: the stack's mixed precision, fp32: fp32 throughout)."""
    if target not in TARGETS:
        raise invalid("emit", target, ", ".join(EMITTERS))
    if target == "megatron":
        args, notes = megatron_args(plan, cfg, train, dtype)
        text = " ".join(shlex.quote(a) for a in args)
    elif target == "deepspeed":
        conf, notes = deepspeed_config(plan, cfg, train, stack or target, dtype)
        text = json.dumps(conf, indent=2)
    else:
        text, notes = torchtitan_config(plan, cfg, train, dtype)
    return text, [f"targets {TARGETS[target]}", *notes]


__all__ = ["DTYPES", "EMITTERS", "TARGETS", "check_emit_model", "deepspeed_config", "emit", "megatron_args", "megatron_env",
           "stack_constraints", "stack_problems", "torchtitan_config", "torchtitan_model", "torchtitan_settings",
           "torchtitan_toml"]
