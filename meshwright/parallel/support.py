"""What the runtimes can run, checked before any model is built: one-line errors for Plans that
``validate_plan`` accepts but a backend (DTensor/megatron TP, torch/DeepSpeed DP) cannot execute."""

from __future__ import annotations

from typing import Any

from meshwright.config import ModelConfig
from meshwright.errors import invalid
from meshwright.plan import Plan

TP_BACKENDS = ("dtensor", "megatron")
DP_BACKENDS = ("torch", "deepspeed")


def check_runtime_support(plan: Plan, cfg: ModelConfig, tp_backend: str, dp_backend: str) -> None:
    """One-line errors for Plans that validate but this runtime cannot run (beyond validate_plan)."""
    if tp_backend not in TP_BACKENDS:
        raise invalid("tp_backend", tp_backend, ", ".join(TP_BACKENDS))
    if dp_backend not in DP_BACKENDS:
        raise invalid("dp_backend", dp_backend, ", ".join(DP_BACKENDS))
    strategies = plan.layer_strategies()
    cps = sorted({s.cp for s in strategies})
    if cps != [1]:
        raise invalid("layers[*].cp", cps, "1 (context parallelism is planned, not yet run: the runtime supports tp, sp, dp/ZeRO, pp, ep)")
    if cfg.tie_embeddings and plan.pipeline.degree > 1:
        raise invalid("pipeline.degree", plan.pipeline.degree, "1 for tied embeddings (the runtime does not all-reduce the embedding gradient across stages)")
    if plan.embedding.tp != 1:
        raise invalid("embedding.tp", plan.embedding.tp, "1 (the runtime replicates embeddings and head over tp)")
    uniform_tp1 = all(s.tp == 1 for s in strategies)
    max_dp = max(s.dp for s in strategies)
    for i, s in enumerate(strategies):
        f = f"layers[{i}]"
        if tp_backend == "megatron" and s.sp:
            raise invalid(f"{f}.sp", s.sp, "false with tp_backend=megatron (use tp_backend=dtensor for sequence parallelism)")
        if tp_backend == "megatron" and s.tp > 1 and s.zero >= 2:
            raise invalid(f"{f}.zero", s.zero, "0 or 1 with tp_backend=megatron (FSDP shards DTensor parameters only)")
        if s.zero == 1 and not (uniform_tp1 and all(t.zero == 1 for t in strategies)) and dp_backend == "torch":
            raise invalid(f"{f}.zero", s.zero, "0, 2 or 3; zero=1 needs every layer tp=1, zero=1 (ZeroRedundancyOptimizer over one dp group) or dp_backend=deepspeed")
        if cfg.is_moe_layer(i):
            if s.sp:
                raise invalid(f"{f}.sp", s.sp, "false on MoE layers (experts need tp-replicated tokens)")
            # zero 2/3: the experts FSDP-sharded over their expert-data-parallel group (parallel/expert_fsdp.py)
            if s.ep > 1 and s.zero >= 2 and s.dp_shard is not None and s.dp_shard < s.dp:
                raise invalid(f"{f}.dp_shard", s.dp_shard, "null with ep>1 and zero>=2 (HSDP of the non-expert "
                              "parameters beside FSDP of the experts over edp is not run)")
            if s.ep > 1 and s.zero == 1:
                raise invalid(f"{f}.zero", s.zero, "0, 2 or 3 with ep>1 (ZeroRedundancyOptimizer would average expert shards over the whole dp group)")
            if s.ep > 1 and s.dp != max_dp:
                raise invalid(f"{f}.dp", s.dp, f"the largest dp of the plan ({max_dp}) on MoE layers with ep>1 (no batch gather before expert dispatch)")
            if tp_backend == "megatron" and s.tp > 1:
                raise invalid("tp_backend", tp_backend, f"dtensor for MoE layers with tp>1 ({f}.tp={s.tp})")
        if s.savers.lemo is not None:
            raise invalid(f"{f}.savers.lemo", s.savers.lemo, "null (LeMo is a fine-tuning saver applied by meshwright.memory.lemo, not this runtime)")
        # FP8 GEMMs (which need fp8_act) run on DTensor shards (memory/fp8_tp.py); megatron-core's parallel
        # linears are not swapped, so every saver stays refused there
        if (s.savers.fp8_act or s.savers.wta_crs is not None) and tp_backend == "megatron" and s.tp > 1:
            raise invalid("tp_backend", tp_backend, f"dtensor for memory savers on layers with tp>1 ({f}.tp={s.tp})")
    if cfg.n_experts and dp_backend == "deepspeed":
        raise invalid("dp_backend", dp_backend, "torch for MoE models (expert-parallel gradient groups live in DistributedRuntime)")
    if dp_backend == "deepspeed" and any(s.savers.fp8_act or s.savers.wta_crs is not None for s in strategies):
        raise invalid("dp_backend", dp_backend, "torch for plans with memory savers (DistributedRuntime applies them)")
    if dp_backend == "deepspeed":
        if plan.pipeline.degree != 1 or not uniform_tp1:
            raise invalid("dp_backend", dp_backend, "torch unless pipeline.degree=1 and every layer has tp=1 (DeepSpeed runs pure ZeRO data parallelism)")
        if len({s.zero for s in strategies}) != 1:
            raise invalid("layers[*].zero", sorted({s.zero for s in strategies}), "one ZeRO level for all layers with dp_backend=deepspeed")


def check_deepspeed_train(train_cfg: Any, plan: Plan | None, init_from: str | None) -> None:
    """What the DeepSpeed engine cannot run, from the train config, its ``init_from`` and ``plan`` (None: not chosen
    yet, ``plan: auto``): refused before any process group, by ``build_distributed_runtime`` and by ``meshwright
    launch`` before a host starts (it failed there on every rank of every host)."""
    if getattr(train_cfg, "dp_backend", "torch") != "deepspeed":
        return
    chunk_tokens = getattr(train_cfg, "loss_chunk_tokens", 0)
    if chunk_tokens:
        raise invalid("loss_chunk_tokens", chunk_tokens, "0 with dp_backend=deepspeed (the engine wraps the model and "
                      "its head), or dp_backend=torch")
    if getattr(train_cfg, "compile", False):
        raise invalid("compile", True, "false with dp_backend=deepspeed (the engine wraps the model), or dp_backend=torch")
    if init_from is not None:
        raise invalid("init_from", init_from, "null with dp_backend deepspeed (use dp_backend torch to start from "
                      "Hugging Face weights)")
    if plan is not None and plan.layer_strategies()[0].zero == 0:  # DeepSpeedRuntime's own refusal, said earlier
        raise invalid("layers[0].zero", 0, "1, 2 or 3 with dp_backend=deepspeed (zero=0 is plain DDP: use dp_backend="
                      "torch, or a plan with zero 1-3)")
