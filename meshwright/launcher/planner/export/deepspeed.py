"""Plan -> DeepSpeed config JSON."""

from __future__ import annotations

from typing import Any

from meshwright.config import ModelConfig
from meshwright.launcher.planner.export.common import _uniform
from meshwright.plan import Plan


def deepspeed_config(plan: Plan, cfg: ModelConfig) -> tuple[dict[str, Any], list[str]]:
    """DeepSpeed config dict (loads in ``deepspeed.runtime.config.DeepSpeedConfig``)."""
    notes: list[str] = []
    s = _uniform(plan, notes)
    dp = max(x.dp for x in plan.layer_strategies())
    gas = plan.global_batch // (dp * plan.micro_batch)
    conf: dict[str, Any] = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": 1.0,
        "bf16": {"enabled": True},
        "zero_optimization": {"stage": s.zero, "overlap_comm": True, "contiguous_gradients": True},
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "steps_per_print": 100,
        "wall_clock_breakdown": False,
    }
    if s.dp_shard and s.zero == 3:
        conf["zero_optimization"]["zero_hpz_partition_size"] = s.dp_shard
        notes.append(f"HSDP dp_shard={s.dp_shard} exported as ZeRO++ hpZ (a secondary parameter partition of "
                     f"{s.dp_shard} ranks; gradients and optimizer states stay sharded over all {s.dp})")
    elif s.dp_shard:
        notes.append(f"HSDP at ZeRO-2 has no DeepSpeed equivalent: exported sharding over all {s.dp} dp ranks")
    if s.recompute != "none":
        conf["activation_checkpointing"] = {"partition_activations": s.sp, "contiguous_memory_optimization": False,
                                            "number_checkpoints": cfg.n_layers, "cpu_checkpointing": False}
    if s.tp > 1 or plan.pipeline.degree > 1:
        notes.append(f"DeepSpeed needs tp={s.tp} / pp={plan.pipeline.degree} from the model code (Megatron-DeepSpeed mpu, PipelineModule)")
    if plan.pipeline.degree > 1:
        conf["pipeline"] = {"stages": plan.pipeline.degree, "partition": "uniform"}
    return conf, notes
