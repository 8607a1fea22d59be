"""Plan -> torchtitan configuration: a Python function that sets a ``Trainer.Config``'s parallelism,
training and activation-checkpoint fields (torchtitan's configs are Python since 2026; the fields are
checked against the pinned torchtitan/config/configs.py in tests/consumers/torchtitan).

The training dtype is the plan's (``plan --dtype``), in ``TrainingConfig``'s three fields: ``dtype`` stays
"float32" (fp32 parameters, gradients and optimizer states; "bfloat16" there is pure bf16 training, which no
meshwright stack predicts); ``mixed_precision_param`` is "bfloat16" for a bf16 plan, "float32" for an fp32 one;
``mixed_precision_reduce`` is "float32" (its only value). configs.py says the mixed-precision fields act through
fully_shard with dp_shard/cp > 1 and through torch.autocast under DDP; at b5bcd76 the decoders' parallelize.py
(models/llama3/parallelize.py "Always run apply_fsdp_to_decoder", models/deepseek_v3/parallelize.py) call
fully_shard with a MixedPrecisionPolicy of them on every layout, replicate-only (DDP-like: fully_shard over the
dp_replicate x fsdp=1 mesh) and tp/pp included (distributed/fsdp.py apply_fsdp_to_decoder), so the one setting covers
every exported plan."""

from __future__ import annotations

import math
import pprint
from typing import Any, Optional

from meshwright.config import ModelConfig, TrainConfig
from meshwright.launcher.planner.export.common import _uniform, check_dtype, model_code_note, optimizer_settings
from meshwright.launcher.planner.export.stacks import TARGETS
from meshwright.plan import Plan

SCHEDULES = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B"}
AC_CONFIG = {"full": "FullAC.Config()", "selective": "SelectiveAC.Config()", "none": "None"}
# plan dtype -> TrainingConfig.mixed_precision_param (torchtitan's names: TORCH_DTYPE_MAP keys)
PARAM_DTYPE = {"bf16": "bfloat16", "fp32": "float32"}


def module_fqns(plan: Plan, cfg: ModelConfig) -> list[list[str]]:
    """``module_fqns_per_model_part``: the plan's (virtual) stages in torchtitan's module names."""
    ranges = plan.stage_ranges(cfg.n_layers)
    parts = []
    for j, (a, b) in enumerate(ranges):
        names = (["tok_embeddings"] if j == 0 else []) + [f"layers.{i}" for i in range(a, b)]
        parts.append(names + (["norm", "lm_head"] if j == len(ranges) - 1 else []))
    return parts


def torchtitan_settings(plan: Plan, cfg: ModelConfig, train: Optional[TrainConfig] = None, dtype: str = "bf16"
                        ) -> tuple[dict[str, dict[str, Any]], str, list[str]]:
    """Field values per Trainer.Config section (parallelism, training) for a plan trained in ``dtype``, the
    activation-checkpoint policy, notes."""
    check_dtype(dtype)
    notes: list[str] = []
    model_code_note(cfg, notes, "torchtitan", "the recipe apply_plan is given")
    s = _uniform(plan, notes, cfg)
    pp = plan.pipeline
    if s.zero == 0:
        replicate, shard, reshard = s.dp, 1, None
    else:
        replicate, shard, reshard = 1, s.dp, ("never" if s.zero in (1, 2) else "default")
        if s.dp_shard:  # HSDP: torchtitan's replicate x shard data-parallel mesh
            replicate, shard = s.dp // s.dp_shard, s.dp_shard
    if s.zero in (1, 2):
        notes.append(f"torchtitan has no ZeRO-{s.zero}: exported FSDP with fsdp_reshard_after_forward='never' (parameters "
                     "stay gathered between forward and backward: ZeRO-2-like communication, ZeRO-3 memory at rest)")
    par: dict[str, Any] = {"data_parallel_replicate_degree": replicate, "data_parallel_shard_degree": shard,
                           "tensor_parallel_degree": s.tp, "context_parallel_degree": 1,
                           "pipeline_parallel_degree": pp.degree}
    if s.tp > 1:
        par["enable_sequence_parallel"] = s.sp
    if reshard:
        par["fsdp_reshard_after_forward"] = reshard
    if pp.degree > 1:
        par["pipeline_parallel_schedule"] = SCHEDULES[pp.schedule]
        par["num_pp_microbatches"] = pp.microbatches
        par["module_fqns_per_model_part"] = module_fqns(plan, cfg)
    if cfg.n_experts:
        ep = math.gcd(s.ep, shard * s.tp)  # torchtitan: ep borrows ranks from dp_shard*cp*tp
        par["expert_parallel_degree"] = ep
        if ep != s.ep:
            notes.append(f"torchtitan needs expert_parallel_degree to divide dp_shard*tp={shard}*{s.tp}: exported ep={ep} "
                         f"instead of the planned {s.ep} (plan with ZeRO-3/FSDP to keep it)")
    training: dict[str, Any] = {"num_tokens_per_microbatch_per_dp_rank": plan.micro_batch * plan.seq_len,
                                "num_tokens_per_train_step": plan.global_batch * plan.seq_len,
                                "max_context_length": plan.seq_len,
                                "dtype": "float32", "mixed_precision_param": PARAM_DTYPE[dtype],
                                "mixed_precision_reduce": "float32"}
    t = optimizer_settings(train, notes, "torchtitan")
    if t is not None:
        training.update({"max_norm": t.grad_clip, "steps": t.steps})
        notes.append(f"optimizer: set config.optimizer lr={t.lr}, betas=({t.beta1}, {t.beta2}), eps={t.eps}, "
                     f"weight_decay={t.weight_decay}; lr_scheduler warmup_steps={t.warmup_steps}, min_lr={t.min_lr}")
    if plan.optimizer.states == "fp8":
        notes.append("COAT FP8 optimizer states have no torchtitan setting: exported fp32 Adam states (more memory)")
    return {"parallelism": par, "training": training}, AC_CONFIG[s.recompute], notes


def torchtitan_config(plan: Plan, cfg: ModelConfig, train: Optional[TrainConfig] = None,
                      dtype: str = "bf16") -> tuple[str, list[str]]:
    """Python source: ``apply_plan(config)`` sets the planned fields on a torchtitan ``Trainer.Config``."""
    sections, ac, notes = torchtitan_settings(plan, cfg, train, dtype)
    lines = [f'"""meshwright plan for {cfg.name}: seq {plan.seq_len}, global batch {plan.global_batch}, {dtype}.',
             f"Targets {TARGETS['torchtitan']}.",
             "Use: config = apply_plan(<your recipe>()) in a module passed to --module/--config.\"\"\"", ""]
    if ac != "None":
        lines.append(f"from torchtitan.distributed.activation_checkpoint import {ac.split('.')[0]}")
    lines.append("from torchtitan.trainer import Trainer")
    lines.append("")
    for name, values in sections.items():
        lines.append(f"{name.upper()} = " + pprint.pformat(values, width=120, compact=True, sort_dicts=False))
    lines += ["", "", "def apply_plan(config: Trainer.Config) -> Trainer.Config:",
              "    for key, value in PARALLELISM.items():", "        setattr(config.parallelism, key, value)",
              "    for key, value in TRAINING.items():", "        setattr(config.training, key, value)",
              f"    config.activation_checkpoint = {ac}", "    return config"]
    return "\n".join(lines) + "\n", notes


def torchtitan_toml(plan: Plan, cfg: ModelConfig, train: Optional[TrainConfig] = None,
                    dtype: str = "bf16") -> tuple[str, list[str]]:
    """Deprecated name of :func:`torchtitan_config` (torchtitan dropped its TOML job config)."""
    return torchtitan_config(plan, cfg, train, dtype)
