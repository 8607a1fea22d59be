"""Plan -> Megatron-LM ``pretrain_gpt.py`` arguments and environment (checked against the pinned
arguments.py of tests/consumers/megatron_lm with its own parser and validate_args).

The training dtype is the plan's (``plan --dtype``). bf16 writes ``--bf16``: bf16 parameters, fp32 main gradients
(validate_args turns on accumulate_allreduce_grads_in_fp32) and fp32 main weights in the optimizer. fp32 writes no
precision flag: validate_args keeps ``params_dtype = torch.float``, gradients are accumulated and reduced in the
parameters' dtype, and the optimizer is FP32Optimizer, or with ``--use-distributed-optimizer`` the
DistributedOptimizer, which shards fp32 parameters directly (megatron/core/optimizer/__init__.py
``_get_megatron_optimizer_based_on_param_groups``; distrib_optimizer.py ``shard_fp32_groups``: no master copy);
``--use-torch-fsdp2`` shards them without a mixed-precision policy."""

from __future__ import annotations

from typing import Optional

from meshwright.config import ModelConfig, TrainConfig
from meshwright.errors import invalid
from meshwright.launcher.planner.export.common import _uniform, check_dtype, optimizer_settings, stage_sizes
from meshwright.launcher.planner.export.stacks import megatron_fsdp2_refusal
from meshwright.launcher.planner.stack import STACKS
from meshwright.plan import Plan


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else repr(float(x))


def megatron_env(plan: Plan, cfg: ModelConfig) -> dict[str, str]:
    """Environment Megatron-LM needs: one CUDA work queue so TP/SP communication overlaps in issue order
    (validate_args refuses tp>1 without it before Blackwell, unless FSDP is on)."""
    s = _uniform(plan, [], cfg)
    fsdp = megatron_fsdp2_refusal(plan.pipeline.degree, [s], cfg.tie_embeddings) is None
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if s.tp > 1 and not fsdp else {}


# Megatron-core's llama3 scaling takes only the factor; the rest is fixed at Llama 3.1's values
# (rotary_pos_embedding.py RotaryEmbedding._apply_scaling defaults)
MEGATRON_LLAMA3_FIXED = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def rope_and_window_args(cfg: ModelConfig) -> list[str]:
    """RoPE base and scaling, partial rotary and the sliding window as Megatron-LM's flags (the export used to write plain RoPE
    and full attention for Llama 3.1, Mistral and Phi-3, silently), or a one-line ConfigError for a rope Megatron-LM
    cannot express (its llama3 scaling fixes all but the factor; its linear interpolation factor is an integer; no
    longrope): exporting plain RoPE would train another model."""
    if not float(cfg.rope_theta).is_integer():
        raise invalid("model.rope_theta", cfg.rope_theta, "an integer for --emit megatron (--rotary-base is an integer)")
    args: list[str] = ["--rotary-base", str(int(cfg.rope_theta))]
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "llama3":
        fixed = {k: v for k, v in MEGATRON_LLAMA3_FIXED.items() if float(scaling.get(k, v)) != v}
        if fixed:
            key = next(iter(fixed))
            raise invalid(f"model.rope_scaling.{key}", scaling[key], f"{MEGATRON_LLAMA3_FIXED[key]:g} for --emit "
                          "megatron (its llama3 scaling fixes low/high_freq_factor 1/4 and original_max_position_embeddings "
                          "8192; only the factor is a flag)")
        args += ["--use-rope-scaling", "--rope-scaling-factor", _num(scaling["factor"])]
    elif kind == "linear":
        factor = float(scaling["factor"])
        if not factor.is_integer():
            raise invalid("model.rope_scaling.factor", scaling["factor"], "an integer for --emit megatron with linear "
                          "scaling (--rotary-seq-len-interpolation-factor is an integer)")
        args += ["--rotary-seq-len-interpolation-factor", str(int(factor))]
    elif kind is not None:
        raise invalid("model.rope_scaling.rope_type", kind, "llama3, linear or null for --emit megatron (core_v0.16.1 "
                      "has no flag for it)")
    if cfg.rope_dim != cfg.head_dim:  # Phi-4-mini: the first rotary_dim dimensions of each head turn
        args += ["--rotary-percent", _num(cfg.rope_dim / cfg.head_dim)]
    if cfg.sliding_window is not None:  # each token sees itself and window-1 before it: TE's (left, right)
        args += ["--window-size", f"{cfg.sliding_window - 1},0"]
    return args


def pipeline_layout(plan: Plan, cfg: ModelConfig) -> str:
    """--pipeline-model-parallel-layout: E(mbedding), t(ransformer) x n, L(oss) per (virtual) stage, '|'-separated,
    in stage order; it carries uneven and interleaved splits exactly."""
    sizes = stage_sizes(plan, cfg.n_layers)
    parts = []
    for j, n in enumerate(sizes):
        parts.append(("E" if j == 0 else "") + (f"t*{n}" if n > 1 else "t") + ("L" if j == len(sizes) - 1 else ""))
    return "|".join(parts)


def megatron_args(plan: Plan, cfg: ModelConfig, train: Optional[TrainConfig] = None,
                  dtype: str = "bf16") -> tuple[list[str], list[str]]:
    """Megatron-LM ``pretrain_gpt.py`` arguments for the plan trained in ``dtype`` (and notes on what was
    approximated)."""
    check_dtype(dtype)
    # the args build Megatron-LM's GPTModel: no flag scales embeddings, norms after the attention/MLP, caps scores or
    # logits, or gates with gelu_tanh (--quick-geglu is x*sigmoid(1.702x)); an export would train another model
    cfg.refuse_gemma("the Megatron-LM export (pretrain_gpt.py's arguments have no flag for them)")
    notes: list[str] = []
    s = _uniform(plan, notes, cfg)
    pp = plan.pipeline
    args = [
        "--num-layers", str(cfg.n_layers), "--hidden-size", str(cfg.d_model),
        "--num-attention-heads", str(cfg.n_heads), "--ffn-hidden-size", str(cfg.ffn_dim),
        "--seq-length", str(plan.seq_len), "--max-position-embeddings", str(max(cfg.max_seq_len, plan.seq_len)),
        "--micro-batch-size", str(plan.micro_batch), "--global-batch-size", str(plan.global_batch),
        "--tensor-model-parallel-size", str(s.tp), "--pipeline-model-parallel-size", str(pp.degree),
        "--norm-epsilon", _num(cfg.norm_eps), "--init-method-std", _num(cfg.init_std),
        # Megatron's dropout defaults are 0.1; the model config says what the model uses
        "--attention-dropout", _num(cfg.dropout), "--hidden-dropout", _num(cfg.dropout),
    ]
    if cfg.kv_heads != cfg.n_heads:
        args += ["--group-query-attention", "--num-query-groups", str(cfg.kv_heads)]
    if cfg.head_dim * cfg.n_heads != cfg.d_model:  # Megatron-LM's default kv_channels is hidden/heads
        args += ["--kv-channels", str(cfg.head_dim)]
    if cfg.qkv_bias:  # Qwen2: --disable-bias-linear below drops every bias; this keeps the q/k/v ones (arguments.py)
        args.append("--add-qkv-bias")
    if cfg.qk_norm:  # Qwen3: Megatron-core's q/k layernorm is per head (kv_channels wide), RMSNorm with --normalization
        args.append("--qk-layernorm")
    if cfg.arch == "llama":
        args += ["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                 "--disable-bias-linear"]
        args += rope_and_window_args(cfg)
    if not cfg.tie_embeddings:
        args.append("--untie-embeddings-and-output-weights")
    if s.sp:
        args.append("--sequence-parallel")
    if pp.degree > 1:
        args += ["--pipeline-model-parallel-layout", pipeline_layout(plan, cfg)]
        if pp.schedule == "gpipe":
            notes.append("Megatron-LM has no GPipe schedule; it will run 1F1B (less activation memory than planned)")
    if s.recompute == "full":
        args += ["--recompute-granularity", "full", "--recompute-method", "uniform", "--recompute-num-layers", "1"]
    elif s.recompute == "selective":
        args += ["--recompute-granularity", "selective"]
    why_not_fsdp = megatron_fsdp2_refusal(pp.degree, [s], cfg.tie_embeddings)  # the rule stack_problems applies
    fsdp = why_not_fsdp is None
    if s.zero == 3 and not fsdp:
        notes.append(f"zero=3 with {why_not_fsdp} (validate_args); exported the distributed optimizer (ZeRO-1) "
                     "instead, which needs more memory")
    if fsdp:
        # FSDP2 refuses gradient-accumulation fusion (a TE/apex kernel writing into .main_grad)
        args += ["--use-torch-fsdp2", "--no-gradient-accumulation-fusion"]
        notes.append("leave CUDA_DEVICE_MAX_CONNECTIONS unset or > 1: Megatron-LM asserts it with FSDP")
        if s.dp_shard:
            notes.append(f"HSDP (dp_shard={s.dp_shard}) with --use-torch-fsdp2 has no Megatron-LM flag: exported "
                         f"sharding over all {s.dp} dp ranks")
    elif s.dp > 1:
        args.append("--overlap-grad-reduce")  # the cost model overlaps the gradient reduce with backward
        if s.zero >= 1:
            args += ["--use-distributed-optimizer", "--overlap-param-gather"]
            if s.zero == 2:
                notes.append("zero=2 exported as --use-distributed-optimizer: Megatron shards the fp32 main weights and "
                             "Adam states (6 + 12/dp bytes per parameter), not the gradients")
            if s.dp_shard:
                args += ["--num-distributed-optimizer-instances", str(s.dp // s.dp_shard)]
                notes.append(f"HSDP dp_shard={s.dp_shard}: the optimizer is sharded within groups of {s.dp_shard} ranks and "
                             f"replicated {s.dp // s.dp_shard}x (--num-distributed-optimizer-instances)")
    if cfg.n_experts:
        args += ["--num-experts", str(cfg.n_experts), "--moe-router-topk", str(cfg.top_k),
                 "--expert-model-parallel-size", str(s.ep),
                 # the experts' tp as the planner costed them (Stack.experts_tp_sharded): Megatron-core's default (= tp)
                 # written out, so a changed default cannot silently halve or double each rank's experts
                 "--expert-tensor-parallel-size", str(s.tp if STACKS["megatron"].experts_tp_sharded else 1),
                 "--moe-router-load-balancing-type", "aux_loss",
                 "--moe-aux-loss-coeff", _num(cfg.aux_loss_coef), "--moe-z-loss-coeff", _num(cfg.z_loss_coef)]
        if cfg.expert_ffn_dim != cfg.ffn_dim:
            args += ["--moe-ffn-hidden-size", str(cfg.expert_ffn_dim)]
        if cfg.moe_every > 1:
            args += ["--moe-layer-freq", str(cfg.moe_every)]
        if cfg.capacity_factor is not None:
            args += ["--moe-expert-capacity-factor", _num(cfg.capacity_factor)]
    if dtype == "bf16":  # fp32: Megatron's default (params_dtype torch.float), no flag
        args.append("--bf16")
    if plan.optimizer.states == "fp8":
        notes.append("COAT FP8 optimizer states have no Megatron-LM flag: exported fp32 Adam states (more memory)")
    t = optimizer_settings(train, notes, "Megatron-LM")
    if t is not None:
        args += ["--lr", _num(t.lr), "--min-lr", _num(t.min_lr), "--lr-decay-style", "cosine",
                 "--lr-warmup-iters", str(t.warmup_steps), "--train-iters", str(t.steps),
                 "--weight-decay", _num(t.weight_decay), "--adam-beta1", _num(t.beta1), "--adam-beta2", _num(t.beta2),
                 "--adam-eps", _num(t.eps), "--clip-grad", _num(t.grad_clip), "--seed", str(t.seed)]
    env = megatron_env(plan, cfg)
    if env:
        notes.append("set " + " ".join(f"{k}={v}" for k, v in env.items()) + " in the launch environment "
                     "(Megatron-LM asserts it with tensor parallelism before Blackwell)")
    return args, notes
