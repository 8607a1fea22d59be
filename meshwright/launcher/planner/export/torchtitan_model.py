"""The model part of the torchtitan export: what the recipe's model must be, and its rotary settings.

torchtitan takes the model from the recipe (``Trainer.Config.model_spec``), not from the parallelism settings, and
every llama3 flavor at b5bcd76 hard-codes Llama 3.1's rope (``ComplexRoPE.Config(theta=500000, scaling="llama")``,
factor 8): a plan for Llama 2, Mistral or a linear-scaled model run with such a recipe trained another model,
silently. The export now writes ``MODEL`` (the shape ``apply_plan`` checks the recipe's model against, raising on a
difference) and ``ROPE`` (the ``RoPE.Config`` fields, models/common/rope.py, that give our model's frequencies,
set on every layer's attention). What torchtitan's rope and llama3 blocks cannot express is refused in one line.
tests/unit/test_exports.py builds torchtitan's own ComplexRoPE cache (pinned rope.py) from ``ROPE`` and compares it
with ``meshwright.models.layers.rope_inv_freq``."""

from __future__ import annotations

from typing import Any

from meshwright.config import ModelConfig
from meshwright.errors import invalid

# linear scaling written as torchtitan's "llama" scaling: every wavelength (>= 2*pi) exceeds
# original_max_position_embeddings / low_freq_factor = 1, so rope.py divides every frequency by the factor and
# blends none (its medium band needs wavelen <= 1)
LINEAR_AS_LLAMA = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 1}


def torchtitan_rope(cfg: ModelConfig) -> dict[str, Any]:
    """``RoPE.Config`` fields (torchtitan models/common/rope.py @ b5bcd76) giving ``cfg``'s rotary frequencies, or a
    one-line ConfigError for a rope torchtitan cannot express."""
    if cfg.rope_dim != cfg.head_dim:
        raise invalid("model.rotary_dim", cfg.rotary_dim, f"null (head_dim={cfg.head_dim}) for --emit torchtitan: its "
                      "RoPE turns every dimension of a head")
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type"))
    out: dict[str, Any] = {"theta": float(cfg.rope_theta), "scaling": "none"}
    if kind == "llama3":
        out.update(scaling="llama", scaling_factor=float(scaling["factor"]),
                   low_freq_factor=float(scaling["low_freq_factor"]), high_freq_factor=float(scaling["high_freq_factor"]),
                   original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    elif kind == "linear":
        out.update(scaling="llama", scaling_factor=float(scaling["factor"]), **LINEAR_AS_LLAMA)
    elif kind is not None:
        raise invalid("model.rope_scaling.rope_type", kind, "llama3, linear or null for --emit torchtitan (its RoPE "
                      "scales by none, llama or yarn; per-frequency factors have no field)")
    return out


def torchtitan_model(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """(MODEL, ROPE): the model fields ``apply_plan`` checks the recipe's model against, and its rope fields; a
    one-line ConfigError for a model torchtitan's decoders cannot be."""
    if cfg.arch != "llama":
        raise invalid("model.arch", cfg.arch, "llama for --emit torchtitan (its decoders are Llama-style blocks)")
    cfg.refuse_gemma("--emit torchtitan (its llama3 and qwen3 decoders compute none of them)")
    if cfg.sliding_window is not None:
        raise invalid("model.sliding_window", cfg.sliding_window, "null for --emit torchtitan (its llama3 and qwen3 "
                      "decoders attend block-causally, with no window)")
    rope = torchtitan_rope(cfg)
    model: dict[str, Any] = {"dim": cfg.d_model, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                             "n_kv_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size,
                             "enable_weight_tying": cfg.tie_embeddings, "qk_norm": cfg.qk_norm,
                             "qkv_bias": cfg.qkv_bias, "norm_eps": float(cfg.norm_eps)}
    if not cfg.n_experts:
        model["hidden_dim"] = cfg.ffn_dim
    return model, rope


# the source apply_plan calls: the recipe's model read in torchtitan's config names (Decoder.Config, GQAttention.Config,
# QKVLinear/FusedQKVLinear.Config, FeedForward.Config, RMSNorm.Config at b5bcd76)
CHECK_SOURCE = '''
def _model_fields(model):
    """The recipe model's fields that MODEL names."""
    attn = model.layers[0].attention
    qkv = attn.qkv_linear
    q = getattr(qkv, "wqkv", None) or getattr(qkv, "wq")
    ffn = model.layers[0].feed_forward
    return {"dim": model.dim, "n_layers": len(model.layers), "n_heads": attn.n_heads,
            "n_kv_heads": attn.n_kv_heads or attn.n_heads, "head_dim": attn.head_dim or model.dim // attn.n_heads,
            "vocab_size": model.vocab_size, "enable_weight_tying": model.enable_weight_tying,
            "qk_norm": attn.qk_norm is not None, "qkv_bias": q.bias, "norm_eps": model.norm.eps,
            "hidden_dim": ffn.w1.out_features if ffn is not None else None}


def apply_model(model):
    """Check the recipe's model is the planned one (ValueError naming the first field that differs: torchtitan would
    train another model) and give every layer the planned rotary settings."""
    found = _model_fields(model)
    for key, value in MODEL.items():
        if found[key] != value:
            raise ValueError(f"model {key}={found[key]!r} in the recipe, the plan's model has {key}={value!r}: "
                             "use a recipe (or model_registry flavor) of the planned model")
    for layer in model.layers:
        layer.attention.rope = dataclasses.replace(layer.attention.rope, **ROPE)
    return model
'''
