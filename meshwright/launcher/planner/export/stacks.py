"""Which layouts each export target can execute, and which consumer version it targets.

``stack_constraints`` turns a target into search constraints (a union of constraint sets: the planner's
Constraints fix one value per field, so "ZeRO-0/1 with any pp, or ZeRO-3 with pp=1" is two sets);
``stack_problems`` says why a finished plan cannot run on the target as planned (the planner then takes
the next-best layout). ``meshwright plan --emit X`` and ``--stack X`` use both.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner.search import Constraints
from meshwright.launcher.planner.stack import STACKS, get_stack
from meshwright.plan import LayerStrategy, Plan

# The consumer each export is written for; tests/consumers/ holds the pinned copies checked against.
TARGETS: dict[str, str] = {
    "megatron": "Megatron-LM core_v0.16.1 (commit 55ac708; pretrain_gpt.py arguments)",
    "deepspeed": "DeepSpeed 0.19 (checked against 0.19.8; pipeline engine rules of runtime/pipe/engine.py)",
    "torchtitan": "torchtitan main @ b5bcd76 (2026-08-21; Python Trainer.Config, the TOML job config is gone)",
}


# DeepSpeed's two bf16 optimizers, both written by ``--emit deepspeed --stack X``: the ZeRO optimizer and
# BF16_Optimizer (``data_types.grad_accum_dtype: fp32`` at ZeRO-1)
DEEPSPEED_STACKS = ("deepspeed", "deepspeed-fp32-accum")
# the stacks whose runnable layouts ``stack_constraints`` knows
RESTRICTED_STACKS = (*TARGETS, "deepspeed-fp32-accum")


# what each stack runs, as the flags that reach it (the error for a --zero/--pp/--ep/--schedule/--virtual-stages
# that excludes every layout of the stack names this; keep in step with ``stack_constraints``)
RUNS: dict[str, str] = {
    "megatron": "--zero 0 or 1 with any --pp/--ep, or --zero 3 with --pp 1 and --ep 1 (untied embeddings); no "
                "--schedule gpipe",
    "deepspeed": "--virtual-stages 1, and --pp 1 (any --zero) or --zero 0/1 with --schedule 1f1b",
    "deepspeed-fp32-accum": "--zero 1 with --schedule 1f1b and --virtual-stages 1 (DeepSpeed builds BF16_Optimizer "
                            "at ZeRO-1 only)",
    "torchtitan": "--zero 0 with --ep 1, or --zero 3",
}


# Megatron-LM's --use-torch-fsdp2 (validate_args): ZeRO-3 with no pipeline and no expert parallelism, untied embeddings.
# One rule for the search (stack_constraints), the as-planned check (stack_problems) and the export (megatron_args).
MEGATRON_FSDP2 = {"zero": 3, "pp": 1, "ep": 1}


def megatron_fsdp2_refusal(pp: int, strategies: list[LayerStrategy], tie_embeddings: bool) -> str | None:
    """Why Megatron-LM's ``--use-torch-fsdp2`` cannot run layers ``strategies`` on ``pp`` pipeline stages (its
    validate_args asserts), or None when it can. A layer below ZeRO-3 is a reason too: it is not FSDP."""
    below = sorted({s.zero for s in strategies if s.zero != MEGATRON_FSDP2["zero"]})
    if below:
        return f"zero={'/'.join(map(str, below))}: --use-torch-fsdp2 is ZeRO-3"
    eps = sorted({s.ep for s in strategies})
    if pp != MEGATRON_FSDP2["pp"] or eps != [MEGATRON_FSDP2["ep"]]:
        return f"--use-torch-fsdp2 needs pp=1 and ep=1 (pp={pp}, ep={'/'.join(map(str, eps))})"
    if tie_embeddings:
        return "--use-torch-fsdp2 needs untied embeddings (--untie-embeddings-and-output-weights)"
    return None


def _sets(base: Constraints, *overrides: dict[str, Any]) -> list[Constraints]:
    """The constraint sets ``base`` + each override, dropping the ones that contradict a user-fixed field."""
    out = []
    for o in overrides:
        if all(getattr(base, k) is None or getattr(base, k) == v for k, v in o.items()):
            out.append(dataclasses.replace(base, **o))
    return out


def stack_constraints(target: str, base: Constraints | None = None, cfg: Any = None) -> list[Constraints]:
    """Constraint sets whose union is what ``target`` can execute (the user's own constraints kept): the stack's
    ``Stack.runs`` (planner/stack.py, where each rule is explained), minus Megatron's FSDP2 set for a model with tied
    embeddings (``cfg``). An empty list: the user's constraints exclude every layout the target runs."""
    if target not in RESTRICTED_STACKS:
        raise invalid("emit", target, ", ".join(RESTRICTED_STACKS))
    base = dataclasses.replace(base or Constraints(), runtime_compatible=False)
    overrides = [dict(o) for o in get_stack(target).runs]
    if target == "megatron":  # --use-torch-fsdp2 shards over all dp ranks: no HSDP flag
        tied = cfg is not None and cfg.tie_embeddings
        fsdp_layer = LayerStrategy(zero=MEGATRON_FSDP2["zero"], ep=MEGATRON_FSDP2["ep"])
        if megatron_fsdp2_refusal(MEGATRON_FSDP2["pp"], [fsdp_layer], tied):
            overrides = [o for o in overrides if o.get("zero") != MEGATRON_FSDP2["zero"]]
    return _sets(base, *overrides)


def restricts(stack: str) -> bool:
    """Whether ``stack`` runs only some of the layouts the search builds (``Stack.runs``)."""
    return stack in STACKS and bool(STACKS[stack].runs)


def search_for_stack(target: str, cfg: Any, cluster: Any, seq_len: int, global_batch: int, hw: Any,
                     constraints: Constraints, top: int = 5, named: str = "") -> Any:
    """Search only the layouts ``target`` runs: the union of its constraint sets, best first, preferring plans it
    runs as planned (``stack_problems``) over ones it would approximate; the stack's layers made to agree
    (``uniform_variants``). ``search()`` comes here for any ``hw.stack`` that restricts, and so does ``plan --emit``
    / ``--stack``. ``named``: how the user named the stack (``stack='deepspeed'``), for the error when their constraints exclude it."""
    from meshwright.launcher.planner.export.uniform import uniform_variants
    from meshwright.launcher.planner.search import Allow, Candidate, search

    sets = stack_constraints(target, constraints, cfg)
    if not sets:
        fixed = " ".join(f"--{k.replace('_', '-')} {getattr(constraints, k)}" for k in
                         ("zero", "pp", "ep", "schedule", "virtual_stages") if getattr(constraints, k) is not None)
        raise ConfigError(f"{named or f'stack={target!r}'} cannot run the layout fixed by {fixed}; valid: {RUNS[target]}")
    results = [search(cfg, cluster, seq_len, global_batch, hw=hw, constraints=c, allow=Allow(), top=top,
                      suggest=False) for c in sets]
    found = [c for r in results for c in ([r.best] if r.best else []) + list(r.runners_up)]
    cache: dict[Any, Any] = {}  # the stack runs one strategy for every layer: the found plans' layers made to agree
    found += [Candidate(p, pred) for c in found for p, pred in uniform_variants(c.plan, cfg, hw, cluster.world_size,
                                                                              cache)]
    cands = sorted(found, key=lambda c: (bool(stack_problems(target, c.plan, cfg)), c.prediction.step_s))
    res = min(results, key=lambda r: r.best.prediction.step_s if r.best else float("inf"))
    if cands:
        res = dataclasses.replace(res, best=cands[0], runners_up=cands[1:top])
    return res


def stack_problems(target: str, plan: Plan, cfg: Any) -> list[str]:
    """Why ``target`` cannot run ``plan`` as planned (empty: it can, perhaps with notes)."""
    strategies = plan.layer_strategies()
    pp = plan.pipeline
    zeros = {s.zero for s in strategies}
    out = []
    if any(s.savers.fp8_act or s.savers.wta_crs or s.savers.lemo for s in strategies):
        out.append("uses meshwright memory savers")
    if plan.optimizer.states != "fp32":
        out.append("uses COAT FP8 optimizer states")
    moe_eps = {s.ep for i, s in enumerate(strategies) if cfg.is_moe_layer(i)}
    if len({(s.tp, s.sp, s.zero, s.dp_shard, s.recompute) for s in strategies}) > 1 or len(moe_eps) > 1:
        out.append("layers use different strategies")
    if target == "megatron":
        if pp.degree > 1 and pp.schedule == "gpipe":
            out.append("Megatron-LM has no GPipe schedule")
        fsdp = [s for s in strategies if s.zero == 3]  # the export's rule (megatron_args), on the ZeRO-3 layers
        fsdp_refusal = megatron_fsdp2_refusal(pp.degree, fsdp, cfg.tie_embeddings) if fsdp else None
        if fsdp_refusal is not None:
            out.append(fsdp_refusal)
        if 2 in zeros:
            out.append("Megatron-LM has no ZeRO-2 (its distributed optimizer shards optimizer states only)")
        if any(s.dp_shard and s.zero == 3 for s in strategies):
            out.append("--use-torch-fsdp2 has no HSDP flag")
    elif target in DEEPSPEED_STACKS:
        if any(s.dp_shard and s.zero == 2 for s in strategies):
            out.append("HSDP at ZeRO-2 has no DeepSpeed equivalent")
        if target == "deepspeed-fp32-accum" and zeros != {1}:
            out.append("DeepSpeed builds BF16_Optimizer (grad_accum_dtype fp32) at ZeRO-1 only")
        elif pp.degree > 1 and zeros & {2, 3}:
            out.append("DeepSpeed's pipeline engine refuses ZeRO-2/3")
        if pp.degree > 1 and pp.schedule != "1f1b":
            out.append(f"DeepSpeed's pipeline engine runs one schedule (1F1B-like), not {pp.schedule}")
    elif target == "torchtitan":
        if zeros & {1, 2}:
            out.append("torchtitan has no ZeRO-1/2")
        if any(s.zero == 0 and s.ep > 1 for s in strategies):
            out.append("torchtitan's expert parallelism borrows its ranks from dp_shard*cp*tp: at ZeRO-0 (dp_shard=1) "
                       "it cannot hold the planned ep over dp")
        for i, s in enumerate(strategies):
            shard = s.dp_shard or (s.dp if s.zero == 3 else 1)
            if s.ep > 1 and (shard * s.tp) % s.ep:
                out.append(f"expert_parallel_degree={s.ep} must divide dp_shard*tp={shard}*{s.tp} (layer {i})")
                break
    return out
