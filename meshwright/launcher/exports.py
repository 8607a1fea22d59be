"""Translate a Plan into the settings of other stacks, so Megatron-LM, DeepSpeed and torchtitan users
benefit from the planner too. Where a stack cannot express part of a plan (per-layer strategies,
ZeRO levels it lacks) the export picks the nearest setting and says so in ``notes``."""

from __future__ import annotations

import json
from typing import Any

from meshwright.config import ModelConfig
from meshwright.errors import invalid
from meshwright.plan import Plan

EMITTERS = ("megatron", "deepspeed", "torchtitan")


def _uniform(plan: Plan, notes: list[str]) -> Any:
    """The strategy of the first layer; note when layers differ (these stacks want one per model)."""
    strategies = plan.layer_strategies()
    first = strategies[0]
    for name in ("tp", "sp", "zero", "dp_shard", "recompute", "ep"):
        values = sorted({str(getattr(s, name)) for s in strategies})
        if len(values) > 1:
            notes.append(f"layers use {name} in {{{', '.join(values)}}}; exported {name}={getattr(first, name)} for all")
    return first


def megatron_args(plan: Plan, cfg: ModelConfig) -> tuple[list[str], list[str]]:
    """Megatron-LM ``pretrain_gpt.py`` arguments for the plan (and notes on what was approximated)."""
    notes: list[str] = []
    s = _uniform(plan, notes)
    pp = plan.pipeline
    args = [
        "--num-layers", str(cfg.n_layers), "--hidden-size", str(cfg.d_model),
        "--num-attention-heads", str(cfg.n_heads), "--ffn-hidden-size", str(cfg.ffn_dim),
        "--seq-length", str(plan.seq_len), "--max-position-embeddings", str(max(cfg.max_seq_len, plan.seq_len)),
        "--micro-batch-size", str(plan.micro_batch), "--global-batch-size", str(plan.global_batch),
        "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(pp.degree),
    ]
    if cfg.kv_heads != cfg.n_heads:
        args += ["--group-query-attention", "--num-query-groups", str(cfg.kv_heads)]
    if cfg.arch == "llama":
        args += ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope", "--disable-bias-linear"]
    if not cfg.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if s.sp:
        args.append("--sequence-parallel")
    if pp.degree > 1 and pp.schedule == "interleaved_1f1b":
        args += ["--num-layers-per-virtual-pipeline-stage", str(cfg.n_layers // (pp.degree * pp.virtual_stages))]
    if pp.degree > 1 and pp.stages and pp.virtual_stages == 1:
        sizes = [b - a for a, b in pp.stages]
        if len(set(sizes)) > 1:
            args += ["--decoder-first-pipeline-num-layers", str(sizes[0]), "--decoder-last-pipeline-num-layers", str(sizes[-1])]
            if len(set(sizes[1:-1])) > 1:
                notes.append(f"stage sizes {sizes}: Megatron splits the middle stages evenly")
    if pp.schedule == "gpipe" and pp.degree > 1:
        notes.append("Megatron-LM has no GPipe schedule; it will run 1F1B")
    if s.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif s.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    if s.zero in (1, 2):
        args.append("--use-distributed-optimizer")
        if s.zero == 2:
            notes.append("zero=2 exported as --use-distributed-optimizer (Megatron shards optimizer states and gradients)")
    elif s.zero == 3:
        args += ["--use-torch-fsdp2"]
    if s.dp_shard:
        notes.append(f"HSDP (dp_shard={s.dp_shard}) has no Megatron-LM flag here: exported sharding over all {s.dp} dp ranks")
    if cfg.n_experts:
        args += ["--num-experts", str(cfg.n_experts), "--moe-router-topk", str(cfg.top_k),
                 "--expert-model-parallel-size", str(max(x.ep for x in plan.layer_strategies()))]
        if cfg.expert_ffn_dim != cfg.ffn_dim:
            args += ["--moe-ffn-hidden-size", str(cfg.expert_ffn_dim)]
    args += ["--bf16"] if plan.optimizer.states == "fp32" else ["--bf16", "--fp8-format", "hybrid"]
    if plan.optimizer.states == "fp8":
        notes.append("COAT FP8 optimizer states have no Megatron-LM flag; exported FP8 compute instead")
    return args, notes


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


def torchtitan_toml(plan: Plan, cfg: ModelConfig) -> tuple[str, list[str]]:
    """torchtitan job-config TOML sections: [parallelism], [training], [activation_checkpoint]."""
    notes: list[str] = []
    s = _uniform(plan, notes)
    pp = plan.pipeline
    replicate, shard, reshard = (s.dp, 1, None) if s.zero == 0 else (1, s.dp, "never" if s.zero in (1, 2) else "default")
    if s.dp_shard:  # HSDP: torchtitan's replicate x shard data-parallel mesh
        replicate, shard = s.dp // s.dp_shard, s.dp_shard
    if s.zero in (1, 2):
        notes.append("torchtitan has no ZeRO-1/2: exported FSDP with reshard_after_forward='never' (ZeRO-2-like)")
    sched = {"1f1b": "1F1B", "gpipe": "GPipe", "interleaved_1f1b": "Interleaved1F1B"}[pp.schedule]
    lines = ["[parallelism]", f"data_parallel_replicate_degree = {replicate}", f"data_parallel_shard_degree = {shard}",
             f"tensor_parallel_degree = {s.tp}", "context_parallel_degree = 1",
             f"pipeline_parallel_degree = {pp.degree}"]
    if pp.degree > 1:
        lines += [f'pipeline_parallel_schedule = "{sched}"', f"pipeline_parallel_microbatch_size = {plan.micro_batch}"]
        if pp.schedule == "interleaved_1f1b":
            lines.append(f"pipeline_parallel_layers_per_stage = {cfg.n_layers // (pp.degree * pp.virtual_stages)}")
    if reshard:
        lines.append(f'fsdp_reshard_after_forward = "{reshard}"')
    if s.tp > 1:
        lines.append(f"disable_loss_parallel = {'false' if s.sp else 'true'}")
    if cfg.n_experts:
        lines.append(f"expert_parallel_degree = {max(x.ep for x in plan.layer_strategies())}")
    lines += ["", "[training]", f"global_batch_size = {plan.global_batch}",
              f"local_batch_size = {plan.global_batch // s.dp}", f"seq_len = {plan.seq_len}",
              "", "[activation_checkpoint]", f'mode = "{s.recompute}"']
    if s.recompute == "selective":
        lines.append('selective_ac_option = "op"')
    return "\n".join(lines) + "\n", notes


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
