"""Plan -> Megatron-LM ``pretrain_gpt.py`` arguments."""

from __future__ import annotations

from meshwright.config import ModelConfig
from meshwright.launcher.planner.export.common import _uniform
from meshwright.plan import Plan


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
