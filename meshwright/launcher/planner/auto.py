"""``meshwright train --plan auto``: the best searched plan for the ranks this run has."""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from meshwright.config import ClusterSpec, ModelConfig, TrainConfig, load_cluster, load_model_config
from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner import cost_model as cm
from meshwright.launcher.planner.search import Allow, Constraints, infeasible_message, search
from meshwright.launcher.profiling.model import apply_model_profile
from meshwright.plan import Plan, validate_plan


def lora_search_terms(cfg: ModelConfig, lora: Any, hw: cm.Hardware, constraints: Constraints
                      ) -> tuple[cm.Hardware, Constraints]:
    """What ``lora:`` changes in the search: model states for the trainable parameters only (``Hardware.lora``: each
    block's adapters, the ends' modules_to_save; ``Hardware.trainable_fraction``, their share of all parameters, where
    no part is named), the step's time (``Hardware.lora``: no dW
    of the frozen base, the adapters' GEMMs, gradients reduced and stepped for the trainable parameters), and the layouts the LoRA runtime runs
    (tp, pp and ep are searched; ep = 1 where the targets name the dense MLP's w1/w2/w3, which ep refuses: train/build.py
    ``check_lora_layout``; the experts' own targets, ``experts.gate_up_proj``/``down_proj``, run under ep and count
    / ep per rank: ``LoraStep.expert_on_rank``)."""
    from meshwright.memory.lora import lora_state_bytes
    from meshwright.memory.lora_cost import EXPERT_TARGETS, lora_step

    state = lora_state_bytes(cfg, lora)
    hw = dataclasses.replace(hw, trainable_fraction=state["trainable"] / (state["weights"] / 4), lora=lora_step(cfg, lora))
    if any(t in EXPERT_TARGETS for t in lora.targets):
        constraints = dataclasses.replace(constraints, ep=1)
    return hw, constraints


def auto_plan(model_cfg: Any, cluster: ClusterSpec | str | dict | int | None = None, world_size: Optional[int] = None,
              seq_len: Optional[int] = None, global_batch: Optional[int] = None, hardware_profile: Optional[dict] = None,
              constraints: Optional[Constraints] = None, allow: Optional[Allow] = None,
              memory_budget_gib: Optional[float] = None, model_profile: Optional[dict] = None,
              model: Optional[ModelConfig] = None) -> Plan:
    """The plan ``meshwright train --plan auto`` uses: best searched plan for ``world_size`` ranks.

    Call as ``auto_plan(model_cfg, cluster, world_size, seq_len, global_batch)`` or, from the trainer,
    ``auto_plan(train_cfg, world_size)`` (model, cluster, seq_len and global_batch come from the
    TrainConfig; ``model``: the resolved model when it is not ``train_cfg.model`` alone, e.g. ``init_from``'s
    config.json). The cluster is reshaped to hold ``world_size`` devices (one node when it fits one
    node). The returned Plan passes ``validate_plan``; an infeasible request raises ConfigError.
    """
    dtype: Optional[str] = None
    compile_, chunk = False, 0
    lora = None
    tp_backend = "dtensor"
    from_train = isinstance(model_cfg, TrainConfig)  # errors then name the train config's fields, not plan's flags
    if isinstance(model_cfg, TrainConfig):
        tc = model_cfg
        dtype = tc.dtype
        compile_, chunk = tc.compile, tc.loss_chunk_tokens
        lora = tc.lora
        tp_backend = tc.tp_backend
        world_size = cluster if isinstance(cluster, int) else world_size
        model_cfg, cluster = (model if model is not None else tc.model), tc.cluster
        seq_len = seq_len or tc.seq_len
        global_batch = global_batch or tc.global_batch
        if constraints is None or constraints.micro_batch is None:
            # the trainer splits each rank's batch into train_cfg.micro_batch-sized pieces
            constraints = dataclasses.replace(constraints or Constraints(), micro_batch=tc.micro_batch)
    if world_size is None or seq_len is None or global_batch is None or cluster is None:
        raise ConfigError("auto_plan needs cluster, world_size, seq_len and global_batch")
    cfg = load_model_config(model_cfg)
    if from_train and seq_len > cfg.max_seq_len:  # was "seq-len=... is invalid", the plan command's flag
        raise invalid("seq_len", seq_len, f"at most model.max_seq_len={cfg.max_seq_len}")
    spec = load_cluster(cluster)
    if world_size <= spec.devices_per_node:
        spec = dataclasses.replace(spec, nodes=1, devices_per_node=world_size)
    elif world_size % spec.devices_per_node == 0:
        spec = dataclasses.replace(spec, nodes=world_size // spec.devices_per_node)
    else:
        raise invalid("world_size", world_size, f"at most {spec.devices_per_node} or a multiple of devices_per_node")
    # the plan runs on meshwright's runtime in the run's dtype (fp32, or fp32 params + bf16 autocast)
    if model_profile is not None:
        dtype = model_profile.get("dtype", "fp32")  # what the profile timed is what this run trains in
    elif spec.device == "cpu":
        dtype = "fp32"
    hw = cm.hardware_from_cluster(spec, hardware_profile, memory_budget_gib, stack="meshwright", dtype=dtype,
                                  compile=compile_, loss_chunk_tokens=chunk)
    # tp_backend megatron: tp>1 layers without sp, ZeRO-2/3 or savers (parallel/support.py), with or without lora
    constraints = dataclasses.replace(constraints or Constraints(), runtime_compatible=True,
                                      megatron_tp=tp_backend == "megatron")
    if lora is not None:  # the frozen base has no grads or optimizer state; LoRA runs dp, tp (both backends), pp
        hw, constraints = lora_search_terms(cfg, lora, hw, constraints)  # and ep, without per-layer FP8 acts or WTA-CRS
    if model_profile is not None:  # after the LoRA terms: a profile of LoRA blocks calibrates on their FLOPs
        hw = apply_model_profile(hw, model_profile, cfg, hardware_profile)
    if lora is not None:
        allow = dataclasses.replace(allow or Allow(), fp8_act=False, wta_crs=None, lemo=None)
    result = search(cfg, spec, seq_len, global_batch, hw=hw, constraints=constraints, allow=allow)
    if result.best is None:
        message = infeasible_message(result)
        if from_train:  # the budget is the cluster's memory here, not `meshwright plan --memory-budget-gib`
            message = "plan='auto' found no layout: " + message.replace("--memory-budget-gib", "cluster.memory_gib")
        raise ConfigError(message)
    plan = result.best.plan
    validate_plan(plan, cfg, world_size)
    return plan
