"""Plan -> DeepSpeed config JSON (checked with DeepSpeed's own DeepSpeedConfig and its pipeline-engine rules).

DeepSpeed takes pipeline stages from the model code (``PipelineModule(num_stages=..., partition_method=...)``),
not from the JSON, so the planned stage split is written as a snippet in the notes. The config is the one the
planner's stack predicts: its ZeRO buffer sizes (``DeepSpeedSizes``) written out, and for ``deepspeed-fp32-accum``
``data_types.grad_accum_dtype: fp32`` at ZeRO-1, the one config for which DeepSpeed 0.19.8 builds BF16_Optimizer
(engine.py ``_do_optimizer_sanity_check``: bf16 + fp32 accumulation at ZeRO-0 raises, at ZeRO-2/3 it builds the ZeRO
optimizer).

The training dtype is the plan's (``plan --dtype``): bf16 writes ``bf16.enabled: true``; fp32 writes
``bf16.enabled: false`` and no ``fp16`` block, so DeepSpeed's model dtype is fp32 (engine.py ``get_data_types``) and
so are gradient accumulation (``data_types.grad_accum_dtype`` defaults to the model dtype) and the gradient reduction
(engine.py ``communication_data_type``: fp32 unless fp16/bf16 is on, so ``communication_data_type`` stays unset, as for
bf16, whose bf16 reduction is what the ``deepspeed`` stack predicts). fp32 builds the ZeRO optimizer at ZeRO-1/2/3 and
plain torch Adam with the engine's all-reduce at ZeRO-0, pipeline or not (``_do_optimizer_sanity_check``: fp32 model
and accumulation -> no wrapper). The ZeRO-1/2/3 optimizers clone each rank's fp32 partition as a master copy even so,
which the planner counts (``PRECISIONS["deepspeed_fp32"]``, the deepspeed stack's fp32 policy). ``deepspeed-fp32-accum``
(bf16 with fp32 accumulation) has no fp32 form. bf16 at ZeRO-0 with pp>1 builds BF16_Optimizer with bf16 accumulation
(the pipeline engine's rule in ``_do_optimizer_sanity_check``), which the planner counts too (the deepspeed stack's
``pipeline_zero0_precision``).

The JSON carries nothing about the model: DeepSpeed trains whatever module the launch script builds. The export says
which transformers class rebuilds ours from the config.json ``hf_config_from_model`` writes (``meshwright export
--hf``), whose rope scaling, window and head shape transformers reads back as ours (tests/unit/test_exports.py), and
names the features other model code would drop."""

from __future__ import annotations

from typing import Any, Optional

from meshwright.config import ModelConfig, TrainConfig
from meshwright.errors import ConfigError, invalid
from meshwright.launcher.planner.export.common import _uniform, check_dtype, optimizer_settings, stage_sizes
from meshwright.launcher.planner.stack import STACKS, Stack
from meshwright.plan import Plan


def pipeline_snippet(plan: Plan, cfg: ModelConfig) -> str:
    """The PipelineModule call that reproduces the planned split (DeepSpeed reads no split from the JSON)."""
    sizes = stage_sizes(plan, cfg.n_layers)
    if len(set(sizes)) == 1:
        return f"PipelineModule(layers, num_stages={plan.pipeline.degree}, partition_method='type:<your block class>')"
    return (f"PipelineModule(layers, num_stages={plan.pipeline.degree}, partition_method='type:<your block class>') "
            f"balances blocks evenly; the plan puts {sizes} blocks on stages 0..{len(sizes) - 1}: override "
            "PipelineModule._partition_layers to set self.parts from these counts")


def model_features(cfg: ModelConfig) -> list[str]:
    """The parts of ``cfg`` a generic decoder lacks (the ones a model code of another family would silently drop)."""
    out = []
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind is not None:
        out.append(f"rope_scaling {kind}" + (f" factor {scaling['factor']:g}" if "factor" in scaling else ""))
    if cfg.rope_theta != 10000.0:
        theta = cfg.rope_theta
        out.append(f"rope theta {int(theta) if float(theta).is_integer() else theta}")
    if cfg.rope_dim != cfg.head_dim:
        out.append(f"rotary on {cfg.rope_dim} of {cfg.head_dim} head dimensions")
    if cfg.sliding_window is not None:
        out.append(f"sliding window {cfg.sliding_window}")
    if cfg.head_dim * cfg.n_heads != cfg.d_model:
        out.append(f"head_dim {cfg.head_dim} (not d_model/n_heads={cfg.d_model // cfg.n_heads})")
    if cfg.kv_heads != cfg.n_heads:
        out.append(f"{cfg.kv_heads} kv heads")
    out += [name for name, on in (("q/k/v biases", cfg.qkv_bias), ("q/k head norms", cfg.qk_norm),
                                  ("tied embeddings", cfg.tie_embeddings)) if on]
    out += [f"Gemma's {name}" for name in cfg.gemma_fields()]
    return out


def model_note(cfg: ModelConfig) -> str:
    """Where the model DeepSpeed trains comes from (the JSON holds none), with what it must have."""
    from meshwright.config.hf import hf_config_from_model

    features = model_features(cfg)
    need = f"; the model has {', '.join(features)}" if features else ""
    try:
        arch = hf_config_from_model(cfg)["architectures"][0]
    except ConfigError as exc:
        return (f"the JSON carries no model and no transformers class is this one ({exc}): your model code must be "
                f"it, or DeepSpeed trains another model{need}")
    return (f"the JSON carries no model: build transformers' {arch} from the config.json meshwright writes for it "
            f"(meshwright export --hf; meshwright.config.hf.hf_config_from_model), other model code trains another "
            f"model{need}")


def deepspeed_config(plan: Plan, cfg: ModelConfig, train: Optional[TrainConfig] = None,
                     stack: str | Stack = "deepspeed", dtype: str = "bf16") -> tuple[dict[str, Any], list[str]]:
    """DeepSpeed config dict (loads in ``deepspeed.runtime.config.DeepSpeedConfig``) running ``stack``, one of
    ``DEEPSPEED_STACKS`` (or such a Stack with other buffer sizes), training in ``dtype`` (bf16 or fp32)."""
    st = STACKS.get(stack) if isinstance(stack, str) else stack
    if st is None or st.deepspeed is None:
        raise invalid("stack", stack if isinstance(stack, str) else stack.name, "deepspeed or deepspeed-fp32-accum")
    if check_dtype(dtype) == "fp32" and st.precision == "bf16_fp32_accum":  # plan --dtype fp32 refuses the same
        raise invalid("dtype", dtype, f"bf16 with stack {st.name} (bf16 training with fp32 gradient accumulation), "
                      "or stack deepspeed for fp32 training")
    notes: list[str] = [model_note(cfg)]
    s = _uniform(plan, notes, cfg)
    pp = plan.pipeline
    gas = plan.global_batch // (s.dp * plan.micro_batch)
    zero = s.zero
    if pp.degree > 1 and zero >= 2:
        notes.append(f"zero={zero} with pp={pp.degree}: DeepSpeed's pipeline engine refuses ZeRO-2/3 "
                     "(runtime/pipe/engine.py); exported ZeRO-1, which needs more memory than planned")
        zero = 1
    conf: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": gas,
        "bf16": {"enabled": dtype == "bf16"},  # fp32: no fp16 block either, so the model dtype is fp32
        "zero_optimization": {"stage": zero},
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if st.precision == "bf16_fp32_accum":  # BF16_Optimizer: ZeRO-1 only (stack_constraints keeps the search there)
        if zero != 1:
            notes.append(f"zero={zero}: DeepSpeed builds BF16_Optimizer (grad_accum_dtype fp32) at ZeRO-1 only; "
                         "exported ZeRO-1")
            zero = conf["zero_optimization"]["stage"] = 1
        conf["data_types"] = {"grad_accum_dtype": "fp32"}
    if zero >= 1:
        conf["zero_optimization"].update({"overlap_comm": True, "contiguous_gradients": True})
    conf["zero_optimization"].update(st.deepspeed.zero_config(zero))
    if s.dp_shard and zero == 3:
        conf["zero_optimization"]["zero_hpz_partition_size"] = s.dp_shard
        notes.append(f"HSDP dp_shard={s.dp_shard} exported as ZeRO++ hpZ (a secondary parameter partition of "
                     f"{s.dp_shard} ranks; gradients and optimizer states stay sharded over all {s.dp})")
    elif s.dp_shard:
        notes.append(f"HSDP at ZeRO-2 has no DeepSpeed equivalent: exported sharding over all {s.dp} dp ranks")
    t = optimizer_settings(train, notes, "DeepSpeed")
    if t is not None:
        conf["gradient_clipping"] = t.grad_clip
        conf["optimizer"] = {"type": "AdamW", "params": {"lr": t.lr, "betas": [t.beta1, t.beta2], "eps": t.eps,
                                                         "weight_decay": t.weight_decay}}
        conf["scheduler"] = {"type": "WarmupCosineLR", "params": {"total_num_steps": t.steps, "warmup_num_steps": t.warmup_steps,
                                                                  "cos_min_ratio": t.min_lr / t.lr}}
    if pp.degree > 1:
        # Read by PipelineEngine; activation_checkpoint_interval=1 recomputes every layer (full recompute)
        conf["pipeline"] = {"activation_checkpoint_interval": 1 if s.recompute != "none" else 0}
        notes.append(f"pipeline stages come from the model code: {pipeline_snippet(plan, cfg)}")
        if pp.schedule != "1f1b":
            notes.append(f"DeepSpeed's pipeline engine has one schedule (1F1B-like TrainSchedule): {pp.schedule} "
                         f"{'with ' + str(pp.virtual_stages) + ' virtual stages ' if pp.virtual_stages > 1 else ''}is not available")
    elif s.recompute != "none":
        conf["activation_checkpointing"] = {"partition_activations": False, "contiguous_memory_optimization": False,
                                            "cpu_checkpointing": False}
        notes.append("recompute: wrap each transformer block in deepspeed.checkpointing.checkpoint (the JSON block only "
                     "configures it)")
    if s.recompute == "selective":
        notes.append("DeepSpeed has no selective (attention-only) recomputation: exported full recomputation, slower than planned")
    if s.tp > 1:
        notes.append(f"tp={s.tp}: DeepSpeed has no tensor parallelism of its own for training; use Megatron-DeepSpeed's mpu "
                     "(or AutoTP) in the model code" + (" with sequence parallelism" if s.sp else ""))
    if cfg.n_experts:
        # the experts' tp as the planner costed them (Stack.experts_tp_sharded: whole on every tp rank, the duplicate
        # tokens dropped over tp by MOELayer): DeepSpeed's default, written out in the layer call
        etp = STACKS["deepspeed"].experts_tp_sharded
        notes.append(f"expert parallelism ep={s.ep}: build the MoE layers with deepspeed.moe.layer.MoE(num_experts="
                     f"{cfg.n_experts}, ep_size={s.ep}, k={cfg.top_k}, enable_expert_tensor_parallelism={etp}); "
                     "the JSON has no expert settings")
    if plan.optimizer.states == "fp8":
        notes.append("COAT FP8 optimizer states have no DeepSpeed setting: exported fp32 Adam states (more memory)")
    return conf, notes
