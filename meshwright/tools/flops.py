"""Model FLOPs per token under named conventions, and hardware FLOPs (with recomputation).

Conventions differ by up to ~15% on the same run, so every MFU figure names the one it used:

- ``palm`` (Chowdhery et al. 2022, App. B; nanoGPT): 6N + 12·L·H·Q·T, N = matmul parameters on the
  activated path (non-embedding + output head; MoE counts top_k experts), attention counted
  non-causally (full T x T; sliding-window blocks too, Mistral's and Gemma's). Norms count as parameters in N, as in
  PaLM's count; Qwen3's q/k head norms (``qk_norm``) add their 2·head_dim weights per block the same way, and Gemma
  2/3's post norms (``post_norms``) their 2·d_model. Soft-capping's tanh and the embedding scale are element-wise and
  left out with the norms' own work. Their element-wise work (~5 FLOPs per q/k
  value, 5·(H + G)·Q per token and block with G KV heads) is left out, as every convention leaves norms out:
  2.6e4 against 3.9e8 matmul FLOPs per token and block at Qwen3-8B (7e-5).
- ``megatron`` (current Megatron-LM ``num_floating_point_operations``): 12·s·l·h²·[(1 + g/a + s/(2h))·q/h
  + f/h·(3/2 if gated)·top_k + V/(2·l·h)] per sequence; the s/(2h) term is the causal halving of the
  attention scores/context matmuls; GQA (g KV groups) and SwiGLU are counted.
- ``megatron2021`` (Narayanan et al. SC'21 eq. 3 without recomputation): 72·B·s·l·h²·(1 + s/(6h) + V/(12·l·h)),
  for dense GPT blocks (4h MLP, MHA, no causal halving).

LoRA runs (``lora=``, a ``memory.lora_cost.LoraStep``) count the FLOPs the step executes, not full training's: the
frozen base computes no weight gradients, so a step is ~4N (forward 2N + input gradients 2N) plus the adapters' 6 per
parameter, under every convention (its full-training count less what LoRA skips, ``lora_flops_per_token``).
``full_training_flops_per_token`` stays available for the MFU a full fine-tune of the same model would quote.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from meshwright.errors import invalid

if TYPE_CHECKING:  # the schema calls into this module (ModelConfig.flops_per_token)
    from meshwright.config.schema import ModelConfig
    from meshwright.memory.lora_cost import LoraStep

Convention = Literal["palm", "megatron", "megatron2021"]
CONVENTIONS: tuple[str, ...] = ("palm", "megatron", "megatron2021")
RecomputeMode = Literal["none", "selective", "full"]


def palm_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """6N + 12·L·H·Q·T (Chowdhery et al. 2022, App. B). N counts the parameters that do matmuls for a token:
    the non-embedding parameters of the *activated* path (MoE: top_k experts + router) plus the output head
    (vocab x d_model); the embedding lookup and learned positions do no FLOPs. The attention term counts the
    full (non-causal) score and context matmuls, as PaLM and nanoGPT do."""
    n = cfg.num_params(non_embedding=True, active_only=True) + cfg.vocab_size * cfg.d_model
    return 6.0 * n + 12.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def layer_fwd_flops(cfg: ModelConfig, index: int, tokens: float, seq_len: int) -> float:
    """Forward FLOPs of block ``index`` for ``tokens`` tokens (PaLM counting, per layer, for the cost model):
    2 per active matmul parameter per token plus the non-causal attention score and context matmuls 4*s*H*Q (H*Q:
    heads x head_dim, d_model unless a checkpoint sets head_dim apart, as Qwen3 does)."""
    return 2.0 * cfg.layer_params(index, active_only=True) * tokens + 4.0 * seq_len * cfg.n_heads * cfg.head_dim * tokens


def head_fwd_flops(cfg: ModelConfig, tokens: float) -> float:
    """Forward FLOPs of the output projection (vocab x d_model)."""
    return 2.0 * cfg.vocab_size * cfg.d_model * tokens


def megatron_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    h, s, l = cfg.d_model, seq_len, cfg.n_layers
    q_ratio = cfg.n_heads * cfg.head_dim / h
    gated = 1.5 if cfg.arch == "llama" else 1.0
    attn = (1 + cfg.kv_heads / cfg.n_heads + s / h / 2) * q_ratio
    dense_mlp = cfg.ffn_dim / h * gated
    moe_mlp = cfg.expert_ffn_dim / h * gated * cfg.top_k
    n_moe = cfg.n_moe_layers
    mlp = (dense_mlp * (l - n_moe) + moe_mlp * n_moe) / l
    per_seq = 12 * s * l * h * h * (attn + mlp + cfg.vocab_size / (2 * l * h))
    return per_seq / s


def megatron2021_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    h, s, l, v = cfg.d_model, seq_len, cfg.n_layers, cfg.vocab_size
    return 72 * s * l * h * h * (1 + s / (6 * h) + v / (12 * l * h)) / s


def model_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "palm",
                          lora: "LoraStep | None" = None) -> float:
    """Training FLOPs (forward + backward) per token of the model under ``convention``; with ``lora``, those a LoRA
    step executes (the convention's full count less the dW and dX LoRA skips, plus the adapters)."""
    full = full_training_flops_per_token(cfg, seq_len, convention)
    if lora is None:
        return full
    from meshwright.memory.lora_cost import lora_flops_per_token

    return full + lora_flops_per_token(cfg, lora, seq_len) - palm_flops_per_token(cfg, seq_len)


def full_training_flops_per_token(cfg: ModelConfig, seq_len: int, convention: str = "palm") -> float:
    """Full training's FLOPs per token (6N + attention under PaLM): every weight's gradient computed."""
    if convention == "palm":
        return palm_flops_per_token(cfg, seq_len)
    if convention == "megatron":
        return megatron_flops_per_token(cfg, seq_len)
    if convention == "megatron2021":
        return megatron2021_flops_per_token(cfg, seq_len)
    raise invalid("flops_convention", convention, ", ".join(CONVENTIONS))


def forward_layer_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the transformer blocks only (PaLM counting), what full recompute repeats."""
    n_layers = cfg.num_params(non_embedding=True, active_only=True) - cfg.norm_params()
    return 2.0 * n_layers + 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def attention_core_forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Forward FLOPs per token of QK^T and AV in all layers: what selective recompute repeats."""
    return 4.0 * cfg.n_layers * cfg.n_heads * cfg.head_dim * seq_len


def hardware_flops_per_token(cfg: ModelConfig, seq_len: int, recompute: str | list[str] = "none",
                             convention: str = "palm", lora: "LoraStep | None" = None) -> float:
    """Model FLOPs plus the forward work repeated by activation recomputation (the HFU numerator).

    ``recompute`` is one mode for all layers or one mode per layer ("none"|"selective"|"full"); ``lora``: a LoRA
    step's FLOPs, full recomputation repeating the adapters' forward too.
    """
    modes = [recompute] * cfg.n_layers if isinstance(recompute, str) else list(recompute)
    if len(modes) != cfg.n_layers:
        raise invalid("recompute", f"{len(modes)} modes", f"one mode or n_layers={cfg.n_layers} modes")
    full = forward_layer_flops_per_token(cfg, seq_len) / cfg.n_layers
    sel = attention_core_forward_flops_per_token(cfg, seq_len) / cfg.n_layers
    extra = 0.0
    for i, m in enumerate(modes):
        if m == "full":
            extra += full + (2.0 * lora.active_adapter(i) if lora is not None else 0.0)
        elif m == "selective":
            extra += sel
        elif m != "none":
            raise invalid("recompute", m, "none, selective or full")
    return model_flops_per_token(cfg, seq_len, convention, lora) + extra


def utilization(tokens_per_s: float, flops_per_token: float, peak_flops_per_device: float, n_devices: int) -> float:
    """Achieved FLOP/s over aggregate peak: MFU with model FLOPs, HFU with hardware FLOPs."""
    if peak_flops_per_device <= 0 or n_devices <= 0:
        raise invalid("peak_flops_per_device", peak_flops_per_device, "a positive number (and n_devices > 0)")
    return tokens_per_s * flops_per_token / (peak_flops_per_device * n_devices)


def tflops_per_device(tokens_per_s: float, flops_per_token: float, n_devices: int) -> float:
    return tokens_per_s * flops_per_token / n_devices / 1e12
