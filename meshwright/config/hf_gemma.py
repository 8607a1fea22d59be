"""Gemma, Gemma 2 and Gemma 3 (text) ``config.json`` <-> ModelConfig (``hf.py`` dispatches here).

What the three share, fixed in transformers' modeling code rather than named in the file: RMSNorm scaling by
``1 + weight`` in fp32, embeddings times sqrt(hidden_size), a GeGLU MLP (``gelu_pytorch_tanh``; Gemma 1's legacy
``gelu`` means the same, as GemmaConfig says), tied embeddings by default. Gemma 2 adds the post-attention/feed-forward
norms, ``query_pre_attn_scalar``, attention and final-logit soft-capping and a window on alternating layers; Gemma 3
keeps the norms and the scalar, drops the attention capping (transformers' Gemma3Attention never applies it), adds
q/k head norms, one window on 5 of every 6 layers and a second rope base for those (``rope_local_base_freq``, or
transformers 5's per-layer-type ``rope_parameters``), with rope scaling on the full-attention layers only.
Absent keys take the value transformers' config class gives them; a setting meshwright cannot run is a one-line error.
"""

from __future__ import annotations

from typing import Any

from meshwright.config.schema import MAX_SIZES, ModelConfig
from meshwright.errors import invalid

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM"}
# config-class defaults of the keys below (transformers 5.24 configuration_gemma*.py)
_DEFAULTS = {
    "gemma": {"max_position_embeddings": 8192, "head_dim": 256},
    "gemma2": {"max_position_embeddings": 8192, "head_dim": 256, "query_pre_attn_scalar": 256, "sliding_window": 4096,
               "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "pattern": 2},
    "gemma3_text": {"max_position_embeddings": 131_072, "head_dim": 256, "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "attn_logit_softcapping": None, "final_logit_softcapping": None,
                    "pattern": 6},
}
_TANH_GELU = ("gelu_pytorch_tanh",)
FULL, SLIDING = "full_attention", "sliding_attention"


def gemma_fields(model_type: str, data: dict[str, Any], out: dict[str, Any]) -> None:
    """Fill ``out`` (the shared keys already mapped by ``hf.HF_KEYS``) with what a Gemma config.json means."""
    from meshwright.config.hf import _rope

    defaults = _DEFAULTS[model_type]
    for key, valid in (("attention_bias", "false"), ("use_bidirectional_attention", "false (causal attention)")):
        if data.get(key) not in (False, None):
            raise invalid(f"config.json {key}", data[key], f"{valid} (the only value meshwright runs)")
    if data.get("attention_dropout") not in (0, 0.0, None):
        raise invalid("config.json attention_dropout", data["attention_dropout"], "0 (not mapped: model.dropout would "
                      "also drop the embeddings and residuals)")
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    act = data.get(act_key) or "gelu_pytorch_tanh"
    if act not in _TANH_GELU + (("gelu",) if model_type == "gemma" else ()):
        raise invalid(f"config.json {act_key}", act, "gelu_pytorch_tanh (GeGLU with tanh-approximated gelu)")
    out.update(norm_unit_offset=True, scale_embeddings=True, mlp_act="gelu_tanh")
    out.setdefault("tie_embeddings", True)
    out.setdefault("norm_eps", 1e-6)
    out.setdefault("max_seq_len", defaults["max_position_embeddings"])
    head_dim = data.get("head_dim", defaults["head_dim"])
    heads, hidden = data.get("num_attention_heads"), data.get("hidden_size")
    if not (isinstance(heads, int) and isinstance(head_dim, int) and head_dim * heads == hidden):
        out["attn_head_dim"] = head_dim  # ModelConfig names a bad value
    if model_type == "gemma":
        if data.get("sliding_window") is not None:
            raise invalid("config.json sliding_window", data["sliding_window"], "null for model_type gemma")
        theta, scaling = _rope(data)
        _set_rope(out, theta, scaling)
        return
    out["post_norms"] = True
    scalar = data.get("query_pre_attn_scalar", defaults["query_pre_attn_scalar"])
    out["query_pre_attn_scalar"] = scalar
    attn_cap = data.get("attn_logit_softcapping", defaults["attn_logit_softcapping"])
    final_cap = data.get("final_logit_softcapping", defaults["final_logit_softcapping"])
    if model_type == "gemma3_text" and attn_cap is not None:
        raise invalid("config.json attn_logit_softcapping", attn_cap, "null for model_type gemma3_text (transformers' "
                      "Gemma 3 attention does not apply it)")
    out["attn_softcap"], out["final_softcap"] = attn_cap, final_cap
    window, every = _layer_pattern(data, defaults)
    if window is not None:
        out["sliding_window"], out["global_every"] = window, every
    if model_type == "gemma2":
        theta, scaling = _rope(data)
        _set_rope(out, theta, scaling)
        return
    out["qk_norm"] = True
    _gemma3_rope(data, out, window is not None, every > 0 or window is None)


def _set_rope(out: dict[str, Any], theta: Any, scaling: Any) -> None:
    if theta is not None:
        out["rope_theta"] = theta
    if scaling is not None:
        if scaling.get("rope_type") == "longrope":
            raise invalid("config.json rope_parameters.rope_type", "longrope", "default, linear or llama3 for Gemma")
        out["rope_scaling"] = scaling


def _layer_pattern(data: dict[str, Any], defaults: dict[str, Any]) -> tuple[int | None, int]:
    """(sliding window or None, global_every) from ``layer_types`` (else the config class's default pattern: Gemma 2
    every 2nd, Gemma 3 every ``sliding_window_pattern``-th layer attends fully). meshwright runs a window on every layer
    but each N-th, so another mix of layer types is refused."""
    n = data["num_hidden_layers"]
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= MAX_SIZES["n_layers"]:
        return None, 0  # model.n_layers names the value (a pattern over 10^18 layers would not finish)
    types = data.get("layer_types")
    if types is None:
        pattern = data.get("sliding_window_pattern", defaults["pattern"])
        if isinstance(pattern, bool) or not isinstance(pattern, int) or pattern < 1:
            raise invalid("config.json sliding_window_pattern", pattern, "a positive integer (every N-th layer "
                          "attends fully)")
        types = [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if not isinstance(types, list) or len(types) != n or set(types) - {FULL, SLIDING}:
        raise invalid("config.json layer_types", types, f"{n} entries (num_hidden_layers), each {FULL} or {SLIDING}")
    if SLIDING not in types:
        return None, 0
    window = data.get("sliding_window", defaults["sliding_window"])
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise invalid("config.json sliding_window", window, f"a positive number of tokens (layer_types has {SLIDING})")
    if FULL not in types:
        return window, 0
    every = types.index(FULL) + 1
    if any((t == FULL) != ((i + 1) % every == 0) for i, t in enumerate(types)):
        full = [i for i, t in enumerate(types) if t == FULL]
        raise invalid("config.json layer_types", f"full_attention at layers {full}", "full_attention on every N-th "
                      "layer exactly (layers N-1, 2N-1, ...), sliding_attention elsewhere")
    return window, every


def _gemma3_rope(data: dict[str, Any], out: dict[str, Any], has_local: bool, has_global: bool) -> None:
    """Gemma 3's two rope settings: the full-attention layers' base and scaling, the windowed layers' base (unscaled),
    from transformers 5's ``rope_parameters`` per layer type or 4.x's rope_theta / rope_scaling /
    ``rope_local_base_freq`` (Gemma3TextConfig.convert_rope_params_to_dict: defaults 1e6 and 1e4)."""
    from meshwright.config.hf import _rope

    params = data.get("rope_parameters")
    if isinstance(params, dict) and set(params) & {FULL, SLIDING}:
        extra = sorted(set(params) - {FULL, SLIDING})
        if extra:
            raise invalid(f"config.json rope_parameters.{extra[0]}", params[extra[0]], f"only {FULL} and {SLIDING} "
                          f"entries (per layer type)")
        full, local = params.get(FULL) or {}, params.get(SLIDING) or {}
        if not isinstance(full, dict) or not isinstance(local, dict):
            raise invalid("config.json rope_parameters", params, "a mapping per layer type")
        full = {"rope_theta": 1_000_000.0, **full}
        local = {"rope_theta": 10_000.0, **local}
    elif params is not None and not isinstance(params, dict):
        raise invalid("config.json rope_parameters", params, f"a mapping per layer type ({FULL}, {SLIDING}) or null")
    else:
        legacy = data.get("rope_scaling")
        if legacy is not None and not isinstance(legacy, dict):
            raise invalid("config.json rope_scaling", legacy, "a mapping or null")
        full = dict(params) if isinstance(params, dict) else {**(legacy or {})}
        full.setdefault("rope_theta", data.get("rope_theta", 1_000_000.0))
        local = {"rope_type": "default", "rope_theta": data.get("rope_local_base_freq", 10_000.0)}
    theta, scaling = _rope({"rope_parameters": full})
    local_theta, local_scaling = _rope({"rope_parameters": local})
    if not has_global:  # every layer windowed: the local setting is the model's only one
        theta, scaling, local_scaling = local_theta, local_scaling, None
    if local_scaling is not None:
        raise invalid(f"config.json rope_parameters.{SLIDING}.rope_type", local_scaling.get("rope_type"),
                      "default (the windowed layers' rope is unscaled)")
    _set_rope(out, theta, scaling)
    if has_local and has_global:
        out["rope_local_theta"] = local_theta


def gemma_hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """config.json for GemmaForCausalLM (no post norms), Gemma2ForCausalLM (post norms, no q/k norms) or
    Gemma3ForCausalLM (post norms and q/k norms); a model none of them computes is refused, naming the field."""
    fixed = {"norm_unit_offset": True, "scale_embeddings": True, "mlp_act": "gelu_tanh"}
    for name, want in fixed.items():
        if getattr(cfg, name) != want:
            raise invalid(f"model.{name}", getattr(cfg, name), f"{want!r} for a Hugging Face export of a model with "
                          f"{', '.join(cfg.gemma_fields())} (only Gemma has them, and Gemma always has {name})")
    for name, bad in (("qkv_bias", cfg.qkv_bias), ("fused_proj", cfg.fused_proj), ("n_experts", cfg.n_experts),
                      ("rotary_dim", cfg.rotary_dim not in (None, cfg.head_dim))):
        if bad:
            raise invalid(f"model.{name}", getattr(cfg, name), "its default for a Gemma export (Gemma has none)")
    model_type = "gemma3_text" if cfg.qk_norm else "gemma2" if cfg.post_norms else "gemma"
    if model_type == "gemma3_text" and not cfg.post_norms:
        raise invalid("model.post_norms", False, "true with qk_norm for a Gemma export (Gemma 3 has both)")
    if model_type == "gemma":
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap", "sliding_window"):
            if getattr(cfg, name) is not None and not (name == "query_pre_attn_scalar" and
                                                       float(cfg.query_pre_attn_scalar) == cfg.head_dim):
                raise invalid(f"model.{name}", getattr(cfg, name), "null without post_norms (Gemma 1 export; Gemma 2 "
                              "has post_norms)")
    if model_type == "gemma2" and cfg.rope_local_theta is not None:
        raise invalid("model.rope_local_theta", cfg.rope_local_theta, "null without qk_norm (Gemma 2 export: one rope "
                      "base; Gemma 3 has q/k norms)")
    if model_type == "gemma3_text" and cfg.attn_softcap is not None:
        raise invalid("model.attn_softcap", cfg.attn_softcap, "null with qk_norm (Gemma 3 export: transformers' Gemma 3 "
                      "does not cap attention scores)")
    if cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "longrope":
        raise invalid("model.rope_scaling.rope_type", "longrope", "linear or llama3 for a Gemma export")
    rope: dict[str, Any] = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    rope["rope_theta"] = cfg.rope_theta
    out: dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim, "intermediate_size": cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "hidden_act": "gelu_pytorch_tanh", "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": False,
        "attention_dropout": 0.0, "rope_parameters": rope, "bos_token_id": None, "eos_token_id": None,
        "pad_token_id": None, "torch_dtype": "float32",
    }
    if model_type == "gemma":
        return out
    scalar = cfg.query_pre_attn_scalar if cfg.query_pre_attn_scalar is not None else cfg.head_dim
    out.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=_int_if_whole(scalar),
               attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap,
               sliding_window=cfg.sliding_window, use_bidirectional_attention=False,
               layer_types=[SLIDING if cfg.layer_window(i) is not None else FULL for i in range(cfg.n_layers)])
    if model_type == "gemma3_text":
        local = rope if cfg.rope_local_theta is None else {"rope_type": "default", "rope_theta": cfg.rope_local_theta}
        out["rope_parameters"] = {FULL: rope, SLIDING: local}
    return out


def _int_if_whole(x: float) -> float | int:
    """Gemma2Config/Gemma3TextConfig type query_pre_attn_scalar as an int: a whole number is written as one."""
    return int(x) if float(x).is_integer() else x
