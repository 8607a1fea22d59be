"""Bytes a block saves for backward, plain and with COAT FP8 activations: the planner's activation terms.

Why a module of its own: the planner (``cost_model``) is arithmetic and must not import torch to count bytes;
:mod:`meshwright.memory.fp8_activations` (the torch implementation these formulas describe) re-exports them.
"""

from __future__ import annotations

from meshwright.config import ModelConfig

GROUP = 16  # COAT's 1 x 16 groups for non-linear inputs


def block_linear_params(cfg: ModelConfig) -> int:
    """Weights of one dense block's linear layers (q, k, v, o and the MLP's two or three matrices)."""
    d, hq, kv, f = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.ffn_dim
    return 2 * d * hq + 2 * d * kv + (2 if cfg.arch == "gpt2" else 3) * d * f


def block_saved_bytes_per_token(cfg: ModelConfig, fp8_act: bool = False, tokens: int | None = None,
                                dtype_bytes: int = 4, fp8_gemm: bool = False) -> float:
    """Bytes one dense block saves for backward per token (the planner's activation term).

    Counted tensor by tensor from what autograd keeps in our Block, including the block's input (kept by
    its first norm); equals ``count_saved_bytes`` of a block exactly for fp32 (``dtype_bytes=4``) and
    bf16 (2) compute (tests check both). Llama block: per norm its input (upcast to fp32), 1/rms, the
    normalised and the weighted output; SDPA's q, k, v (after the GQA repeat), output (= wo's input)
    and fp32 logsumexp; the MLP's a, b, silu(a) and the product. With FP8: norm inputs and MLP
    activations become FP8 + one fp32 scale per 1x16 group, linear inputs FP8, the attention core stays
    in the compute dtype. ``tokens`` adds the per-tensor scales (3 fp32 scalars per block).
    ``fp8_gemm`` (with ``fp8_act``): wo's input is saved in FP8 too (its GEMM runs in FP8), and with
    ``tokens`` the FP8 weight copies the backward GEMMs reuse (1 byte per linear weight) and their scales.
    """
    rep, shard = block_saved_bytes_split(cfg, fp8_act, dtype_bytes, fp8_gemm)
    extra = 0.0
    if fp8_act and tokens:
        extra = 12 / tokens
        if fp8_gemm:
            n_linear = 6 if cfg.arch == "gpt2" else 7
            extra += (block_linear_params(cfg) + 4 * (n_linear + 1)) / tokens
    return rep + shard + extra


def block_saved_bytes_split(cfg: ModelConfig, fp8_act: bool = False, dtype_bytes: int = 4,
                            fp8_gemm: bool = False) -> tuple[float, float]:
    """``block_saved_bytes_per_token`` without the per-tensor terms, split as tensor parallelism splits it: (the
    norms' part, outside the tp region: sequence-sharded under SP, else replicated; the attention core and MLP
    part, inside it: divided by tp). Bytes per token."""
    d, hq, f, nh = cfg.d_model, cfg.n_heads * cfg.head_dim, cfg.ffn_dim, cfg.n_heads
    b = dtype_bytes
    gpt2 = cfg.arch == "gpt2"
    core = 4 * hq * b + 4 * nh  # q, k, v, out in the compute dtype + fp32 logsumexp per head
    stats = 8 if gpt2 else 4  # ours: LayerNorm mean and 1/std, RMSNorm 1/rms, in fp32
    if not fp8_act:
        # gpt2: input, output, mean and 1/std (torch's CPU kernel keeps them in the compute dtype);
        # llama: fp32 input, normalised (compute dtype), weighted output, fp32 1/rms
        norm = (2 * d * b + 2 * b) if gpt2 else (4 + 2 * b) * d + 4
        mlp = (2 * f if gpt2 else 4 * f) * b  # gpt2: gelu input, w2 input; llama: a, b, silu(a), w2 input
        return float(2 * norm), float(core + mlp)
    grp = lambda n: n + 4 * -(-n // GROUP)  # noqa: E731  FP8 + fp32 scale per 1x16 group
    norm = grp(d) + stats + d  # FP8 1x16 norm input, stats, FP8 per-tensor input of the next linears
    mlp = (grp(f) if gpt2 else 2 * grp(f)) + f  # FP8 1x16 activation inputs, FP8 per-tensor w2 input
    return float(2 * norm), float(core + mlp + (hq if fp8_gemm else 0))  # fp8_gemm: + wo's FP8 input


def fp8_activation_saved_fraction(cfg: ModelConfig, dtype_bytes: int = 4) -> float:
    """Saved bytes of an FP8-activation block over the plain block in the same compute dtype
    (tiny Llama: 0.354 in fp32, 0.481 in bf16)."""
    return (block_saved_bytes_per_token(cfg, True, dtype_bytes=dtype_bytes)
            / block_saved_bytes_per_token(cfg, False, dtype_bytes=dtype_bytes))
