"""Hugging Face ``config.json`` -> ModelConfig (Llama/Mistral/Qwen2/Qwen3/Qwen3-MoE/Phi-3/Mixtral/GPT-2; Gemma 1/2/3 in
``hf_gemma.py``), and back.

Import keeps what the file says (rope theta wherever transformers wrote it, rope scaling, sliding window,
head_dim, q/k/v biases, Qwen3's q/k head norms, Phi-3's fused projections and longrope, tied embeddings); a
setting meshwright cannot run is a one-line error, never silently dropped. Dropout keys, the pretraining run's
setting rather than the model's, are not imported (one note line when non-zero: DROPOUT_KEYS).
``hf_config_from_model`` is the inverse used by ``meshwright export --hf``.
"""

from __future__ import annotations

import math
import os
import sys
from typing import Any

from meshwright.config.io import from_dict
from meshwright.config.schema import ModelConfig
from meshwright.errors import invalid

MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "qwen3_moe", "phi3", "mixtral", "gpt2", "gemma", "gemma2",
               "gemma3_text", "gemma3")
GEMMA_TYPES = ("gemma", "gemma2", "gemma3_text")

HF_KEYS = {
    # Hugging Face config.json keys -> ModelConfig fields (LlamaConfig, MistralConfig, Qwen2/3Config, MixtralConfig, GPT2Config)
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
    "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings", "num_local_experts": "n_experts", "num_experts_per_tok": "top_k",
    "router_aux_loss_coef": "aux_loss_coef",
    "n_embd": "d_model", "n_layer": "n_layers", "n_head": "n_heads", "n_positions": "max_seq_len",
    "layer_norm_epsilon": "norm_eps", "n_inner": "ffn_hidden",
}

# Settings with one value meshwright runs; anything else is refused (key -> (accepted values, what is valid)).
_GPT2_FIXED = {
    "activation_function": (("gelu_new", "gelu_pytorch_tanh"), "gelu_new (tanh-approximated GELU)"),
    "scale_attn_weights": ((True, None), "true"),
    "scale_attn_by_inverse_layer_idx": ((False, None), "false"),
    "reorder_and_upcast_attn": ((False, None), "false"),
    "add_cross_attention": ((False, None), "false"),
}
_LLAMA_FIXED = {
    "hidden_act": (("silu", None), "silu (SwiGLU)"),
    "mlp_bias": ((False, None), "false"),
    "attention_bias": ((False, None), "false (q/k/v/o biases; Qwen2's q/k/v-only biases are supported)"),
    "pretraining_tp": ((1, None), "1"),
}
# Dropout keys of Hugging Face configs (GPT2Config's three, Phi3Config's three, attention_dropout of LlamaConfig and its
# kin): how the pretraining run regularised, used by transformers only in training mode, not part of the model. One
# rule for every family: none is imported; the run's dropout is meshwright's own model.dropout (default 0: fine-tuning
# without dropout, as nanoGPT's from_pretrained does; one value for embeddings, attention and residuals, which no
# family's keys map onto exactly), and a non-zero key is said in one note line, never dropped silently.
DROPOUT_KEYS = ("attn_pdrop", "embd_pdrop", "resid_pdrop", "attention_dropout")
_said: set[str] = set()  # notes already printed by this process (a config is often read twice: validation, the run)


def dropout_note(data: dict[str, Any]) -> str | None:
    """The one line naming the non-zero dropout keys of ``data`` that the import leaves out, or None."""
    found = [f"{k}={data[k]!r}" for k in DROPOUT_KEYS if k in data and data[k] not in (0, None)]
    if not found:
        return None
    return (f"note: config.json {', '.join(found)} not imported: dropout in a Hugging Face config is its pretraining's "
            f"setting (transformers applies it in training mode); this run's is model.dropout, 0 unless set (e.g. "
            f"model.dropout=0.1 to fine-tune with dropout)")


def _say(note: str | None) -> None:
    """Print ``note`` on stderr once per process, on the main rank only (every rank reads the config)."""
    if note is None or note in _said or os.environ.get("RANK", "0") != "0":
        return
    _said.add(note)
    print(note, file=sys.stderr, flush=True)


def _rope(data: dict[str, Any]) -> tuple[float | None, dict[str, Any] | None]:
    """rope_theta and the scaling spec, from transformers 5's ``rope_parameters`` or 4.x's top-level keys."""
    params = data.get("rope_parameters")
    legacy = data.get("rope_scaling")
    theta = data.get("rope_theta")
    spec: dict[str, Any] | None = None
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        spec = dict(params)
    elif params is not None:
        raise invalid("config.json rope_parameters", params, "a mapping (one rope setting for every layer)")
    if isinstance(legacy, dict):
        spec = {**legacy, **(spec or {})}
    elif legacy is not None:
        raise invalid("config.json rope_scaling", legacy, "a mapping or null")
    if spec is not None:
        spec.pop("rope_theta", None)
        if "type" in spec and "rope_type" not in spec:
            spec["rope_type"] = spec.pop("type")
        spec.pop("type", None)
        if spec.get("rope_type", "default") == "default":
            spec = None
        elif spec.get("rope_type") == "longrope":
            spec = _longrope(spec, data)
        else:
            if spec.get("attention_factor") not in (None, 1, 1.0):
                raise invalid("config.json rope_parameters.attention_factor", spec["attention_factor"], "1 or absent")
            spec.pop("attention_factor", None)
    return theta, spec


def _longrope(spec: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
    """Phi-3's longrope as transformers computes it (``_compute_longrope_parameters``): the short/long factors, the
    original length that picks between them, and the cos/sin scale, fixed here from the file's
    ``max_position_embeddings`` (``factor``) so that a later ``model.max_seq_len`` override keeps the checkpoint's."""
    original = spec.get("original_max_position_embeddings", data.get("original_max_position_embeddings"))
    if isinstance(original, bool) or not isinstance(original, (int, float)) or not original > 1:
        raise invalid("config.json original_max_position_embeddings", original, "the pretraining length (a number "
                      "above 1; longrope picks its long factors past it)")
    factor, attention = spec.get("factor"), spec.get("attention_factor")
    if factor is None:
        longest = data.get("max_position_embeddings")
        if isinstance(longest, bool) or not isinstance(longest, (int, float)):
            raise invalid("config.json max_position_embeddings", longest, "a number of positions")
        factor = longest / original
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
        raise invalid("config.json rope_parameters.factor", factor, "a number or absent")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": spec.get("short_factor"), "long_factor": spec.get("long_factor"),
            "original_max_position_embeddings": original, "attention_factor": attention}


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_fixed(data: dict[str, Any], fixed: dict[str, tuple[tuple, str]]) -> None:
    for key, (accepted, valid) in fixed.items():
        if key in data and data[key] not in accepted:
            raise invalid(f"config.json {key}", data[key], f"{valid} (the only value meshwright runs)")


def model_config_from_hf(data: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face ``config.json`` onto a ModelConfig, refusing settings meshwright cannot run."""
    model_type = data.get("model_type")
    if model_type not in MODEL_TYPES:
        raise invalid("config.json model_type", model_type, ", ".join(MODEL_TYPES))
    if model_type == "gemma3":
        data, model_type = gemma3_text_config(data), "gemma3_text"
    gpt2 = model_type == "gpt2"
    shape_keys = ("vocab_size", "n_embd", "n_layer", "n_head") if gpt2 else (
        "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    if model_type in GEMMA_TYPES:  # Gemma's classes default it to 16 or 4, not to the head count
        shape_keys += ("num_key_value_heads",)
    missing = [k for k in shape_keys if data.get(k) is None]
    if missing:  # a default would only show up as a weight-shape mismatch, blamed on the checkpoint
        raise invalid(f"config.json {missing[0]}", None, f"the model's own value (a config.json gives "
                      f"{', '.join(shape_keys)}; defaults are not guessed)")
    out: dict[str, Any] = {"name": data.get("_name_or_path") or name, "arch": "gpt2" if gpt2 else "llama"}
    _say(dropout_note(data))
    for hf_key, ours in HF_KEYS.items():
        if hf_key in data and data[hf_key] is not None:
            out[ours] = data[hf_key]
    if gpt2:
        _check_fixed(data, _GPT2_FIXED)
        out.setdefault("tie_embeddings", True)
        out.pop("n_kv_heads", None)
        return from_dict(ModelConfig, out, prefix="model")
    if model_type in GEMMA_TYPES:
        from meshwright.config.hf_gemma import gemma_fields

        gemma_fields(model_type, data, out)
        return from_dict(ModelConfig, out, prefix="model")
    _check_fixed(data, _LLAMA_FIXED)
    out.setdefault("tie_embeddings", False)
    if model_type == "phi3":  # before _rope: its su/yarn are longrope
        data = _phi3(data, out)
    theta, scaling = _rope(data)
    if theta is not None:
        out["rope_theta"] = theta
    if scaling is not None:
        if scaling["rope_type"] == "longrope" and model_type != "phi3":
            raise invalid("config.json rope_parameters.rope_type", "longrope", f"default, linear or llama3 for "
                          f"model_type {model_type} (longrope is implemented for phi3)")
        out["rope_scaling"] = scaling
    head_dim, heads = data.get("head_dim"), data.get("num_attention_heads")
    if head_dim is not None and not (_is_int(head_dim) and _is_int(heads) and head_dim * heads == data.get("hidden_size")):
        out["attn_head_dim"] = head_dim  # checked there (a mapping here was a TypeError multiplying it)
    layer_types = data.get("layer_types")
    if layer_types is not None and (not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types)):
        raise invalid("config.json layer_types", layer_types, "null or a list of attention type names, one per layer")
    layers = data.get("num_hidden_layers")
    if layer_types is not None and _is_int(layers) and len(layer_types) != layers:  # transformers refuses it too
        raise invalid("config.json layer_types", f"{len(layer_types)} entries", f"one per layer: num_hidden_layers="
                      f"{layers}")
    window = data.get("sliding_window")
    if model_type == "qwen3":
        out["qk_norm"] = True
        window = _qwen3_window(data)
    elif model_type == "qwen3_moe":  # one window on every layer when use_sliding_window (no max_window_layers there);
        out["qk_norm"] = True  # an absent sliding_window is Qwen3MoeConfig's 4096, as transformers reads it
        window = data.get("sliding_window", 4096) if data.get("use_sliding_window") else None
        _qwen3_moe(data, out)
    elif model_type == "qwen2":
        out["qkv_bias"] = True
        types = set(data.get("layer_types") or [])
        if data.get("use_sliding_window") or types - {"full_attention"}:
            raise invalid("config.json use_sliding_window", data.get("use_sliding_window"),
                          "false (Qwen2's per-layer sliding windows are not implemented)")
        window = None
    elif model_type == "phi3":  # transformers masks every layer with sliding_window when it is set
        pass
    elif model_type in ("mistral", "mixtral") and window is not None:
        if data.get("layer_types") and set(data["layer_types"]) - {"sliding_attention"}:
            raise invalid("config.json layer_types", sorted(set(data["layer_types"])), "one attention type for every layer")
    elif window is not None:
        raise invalid("config.json sliding_window", window, f"null for model_type {model_type}")
    if window is not None:
        out["sliding_window"] = window
    if model_type == "mixtral":
        out["moe_ffn_hidden"] = out.pop("ffn_hidden", None)
        out["n_experts"] = data.get("num_local_experts", 8)
        out.setdefault("top_k", 2)
        if _is_int(out["top_k"]) and out["top_k"] < 2:  # another type: model.top_k names it below
            raise invalid("config.json num_experts_per_tok", out["top_k"], "at least 2 (Mixtral renormalises the top-k gates)")
        if data.get("router_jitter_noise"):
            raise invalid("config.json router_jitter_noise", data["router_jitter_noise"], "0 (no router noise)")
    if "n_experts" in out:  # Mixtral and Qwen3-MoE train with the balance loss alone: no router z-loss to add
        out["z_loss_coef"] = 0.0
    return from_dict(ModelConfig, out, prefix="model")


def _qwen3_window(data: dict[str, Any]) -> int | None:
    """Qwen3's window: transformers uses ``sliding_window`` only with ``use_sliding_window``, and then on the layers
    ``layer_types`` (or ``max_window_layers``: layers from that index on) marks sliding. meshwright runs one window
    for every layer or none, so a mix is refused."""
    if not data.get("use_sliding_window"):
        types = set(data.get("layer_types") or [])
        if types - {"full_attention"}:
            raise invalid("config.json layer_types", sorted(types), "full_attention only when use_sliding_window is false")
        return None
    types, start = data.get("layer_types"), data.get("max_window_layers", 28)
    if types is not None and set(types) - {"sliding_attention"}:
        raise invalid("config.json layer_types", sorted(set(types)), "sliding_attention on every layer with "
                      "use_sliding_window (per-layer windows are not implemented)")
    if types is None and start != 0:
        raise invalid("config.json max_window_layers", start, "0 with use_sliding_window (a window on every layer; "
                      "per-layer windows are not implemented)")
    if "sliding_window" not in data:  # Qwen3Config's default, as transformers reads the file (and Qwen3-MoE here)
        return 4096
    if data["sliding_window"] is None:
        raise invalid("config.json sliding_window", None, "a positive number of tokens with use_sliding_window")
    return data["sliding_window"]


def _phi3(data: dict[str, Any], out: dict[str, Any]) -> dict[str, Any]:
    """Phi-3/Phi-4 (Phi3ForCausalLM): llama blocks whose checkpoint fuses q/k/v and gate/up (``fused_proj``), default
    rope or longrope (Phi-3-mini-128k, Phi-3.5-mini: ``su``/``yarn`` are Phi3Config's old names for it, renamed in
    the returned copy of ``data``), partial rotary (Phi-4-mini: ``rotary_dim``). Its dropouts follow every family's
    rule (DROPOUT_KEYS). ``original_max_position_embeddings`` only feeds longrope; with the default rope it changes
    nothing."""
    out["fused_proj"] = True
    for where in ("rope_parameters", "rope_scaling"):
        spec = data.get(where)
        if not isinstance(spec, dict):
            continue  # null, or _rope names the field
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind not in ("default", "longrope", "su", "yarn"):  # Phi3Config refuses any other type
            raise invalid(f"config.json {where}.rope_type", kind, "default or longrope (su and yarn: Phi-3's old names "
                          "for longrope)")
        if kind in ("su", "yarn"):
            spec = {k: v for k, v in spec.items() if k != "type"}
            data = {**data, where: {**spec, "rope_type": "longrope"}}
    _partial_rotary(data, out)
    return data


def _partial_rotary(data: dict[str, Any], out: dict[str, Any]) -> None:
    """Phi3Config's ``partial_rotary_factor``: its rope mapping's, else the top-level key's (Phi-4-mini: 0.75), else 1.
    transformers rotates the first ``int(head_dim * factor)`` dimensions of each head (``rotary_dim``)."""
    spec = data.get("rope_parameters") if isinstance(data.get("rope_parameters"), dict) else data.get("rope_scaling")
    where = "rope_parameters." if isinstance(data.get("rope_parameters"), dict) else "rope_scaling."
    if not isinstance(spec, dict) or "partial_rotary_factor" not in spec:
        spec, where = data, ""
    factor = spec.get("partial_rotary_factor", 1.0)
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor <= 1:
        raise invalid(f"config.json {where}partial_rotary_factor", factor, "a number in (0, 1]: the share of each "
                      "head's dimensions that RoPE rotates")
    if factor == 1:
        return
    hidden, heads = data.get("hidden_size"), data.get("num_attention_heads")
    head_dim = data.get("head_dim") or (hidden // heads if _is_int(hidden) and _is_int(heads) and heads > 0 else None)
    if not _is_int(head_dim):
        return  # the shape keys name themselves later
    rotary = int(head_dim * factor)
    if rotary < 2 or rotary % 2:
        raise invalid(f"config.json {where}partial_rotary_factor", factor, f"a share of head_dim={head_dim} that is "
                      f"an even number of dimensions (here {rotary})")
    out["rotary_dim"] = rotary


def _qwen3_moe(data: dict[str, Any], out: dict[str, Any]) -> None:
    """Qwen3-MoE's experts onto ModelConfig: every ``decoder_sparse_step``-th block (moe_every, the same rule), the
    others dense with ``intermediate_size`` (a shape key the import requires, mapped with the others); absent expert
    keys take Qwen3MoeConfig's defaults, as transformers does. Refused:
    ``mlp_only_layers`` (dense blocks off that rule) and gates other than meshwright's (top-k renormalised when k > 1,
    the raw probability when k = 1)."""
    experts = data.get("num_experts", data.get("num_local_experts", 128))
    out["n_experts"] = experts
    out["top_k"] = data.get("num_experts_per_tok", 8)
    out["moe_ffn_hidden"] = data.get("moe_intermediate_size", 768)
    out["moe_every"] = data.get("decoder_sparse_step", 1)
    if data.get("mlp_only_layers"):
        raise invalid("config.json mlp_only_layers", data["mlp_only_layers"], "[] (dense blocks only where "
                      "decoder_sparse_step leaves them)")
    norm, k = data.get("norm_topk_prob", False), out["top_k"]
    if norm is not None and not isinstance(norm, bool):  # "yes" was read as true
        raise invalid("config.json norm_topk_prob", norm, "true or false")
    if _is_int(k) and k >= 1 and bool(norm) != (k > 1):  # k < 1: model.top_k names it, not the gate
        raise invalid("config.json norm_topk_prob", norm, f"{str(k > 1).lower()} with "
                      f"num_experts_per_tok={k} (meshwright renormalises the top-k gates when k > 1 and gates by the raw "
                      f"probability when k = 1)")


def gemma3_text_config(data: dict[str, Any]) -> dict[str, Any]:
    """Gemma 3's multimodal config.json (Gemma3ForConditionalGeneration): its ``text_config`` as a gemma3_text config
    (the top-level ``tie_word_embeddings`` where the text config has none). The vision tower and its projector are
    not imported: said in one note line, and the weights' loader leaves exactly those tensors unread."""
    text = data.get("text_config")
    if not isinstance(text, dict):
        raise invalid("config.json text_config", text, "the language model's config (a mapping) for model_type gemma3")
    _say("note: config.json model_type gemma3: importing its text model (text_config, language_model weights); the "
         "vision tower and multimodal projector are not imported")
    out = {**text, "model_type": "gemma3_text"}
    if "tie_word_embeddings" not in out and "tie_word_embeddings" in data:
        out["tie_word_embeddings"] = data["tie_word_embeddings"]
    out.setdefault("_name_or_path", data.get("_name_or_path"))
    return out


def hf_config_from_model(cfg: ModelConfig) -> dict[str, Any]:
    """The ``config.json`` transformers needs to rebuild ``cfg`` (LlamaForCausalLM, MistralForCausalLM,
    Qwen2ForCausalLM, Qwen3ForCausalLM, Qwen3MoeForCausalLM, Phi3ForCausalLM, MixtralForCausalLM, GPT2LMHeadModel, or
    GemmaForCausalLM, Gemma2ForCausalLM, Gemma3ForCausalLM: ``hf_gemma``)."""
    if cfg.gemma_fields():
        from meshwright.config.hf_gemma import gemma_hf_config

        return gemma_hf_config(cfg)
    if cfg.arch == "gpt2":
        if cfg.n_experts:
            raise invalid("model.n_experts", cfg.n_experts, "0 for a GPT-2 export")
        return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": cfg.vocab_size,
                "n_embd": cfg.d_model, "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_positions": cfg.max_seq_len,
                "n_inner": cfg.ffn_dim, "layer_norm_epsilon": cfg.norm_eps, "activation_function": "gelu_new",
                "tie_word_embeddings": cfg.tie_embeddings, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32"}
    if cfg.n_experts and cfg.capacity_factor is not None:
        raise invalid("model.capacity_factor", cfg.capacity_factor, "null for a Hugging Face export (Mixtral and "
                      "Qwen3-MoE drop no tokens)")
    if cfg.n_experts and not cfg.qk_norm and cfg.moe_every != 1:
        raise invalid("model.moe_every", cfg.moe_every, "1 (Mixtral: experts in every block; qk_norm exports Qwen3-MoE, "
                      "which takes any moe_every)")
    longrope = cfg.rope_scaling is not None and cfg.rope_scaling.get("rope_type") == "longrope"
    other_rope = cfg.rope_scaling is not None and not longrope
    if cfg.rotary_dim is not None and cfg.rotary_dim != cfg.head_dim and not cfg.fused_proj:
        raise invalid("model.rotary_dim", cfg.rotary_dim, f"null or head_dim={cfg.head_dim} unless fused_proj (partial "
                      f"rotary exports as Phi-3 only)")
    if cfg.fused_proj and (cfg.qk_norm or cfg.qkv_bias or cfg.n_experts or other_rope):
        raise invalid("model.fused_proj", True, "false with qk_norm, qkv_bias, experts or linear/llama3 rope_scaling "
                      "(Phi-3 export: a dense model without biases or head norms, default rope or longrope)")
    if longrope and not cfg.fused_proj:
        raise invalid("model.rope_scaling.rope_type", "longrope", "linear or llama3 unless fused_proj "
                      "(longrope exports as Phi-3 only)")
    if cfg.qk_norm and cfg.qkv_bias:
        raise invalid("model.qk_norm", True, "false with qkv_bias (no Hugging Face architecture has both; Qwen3 "
                      "export: no q/k/v biases)")
    model_type = ("phi3" if cfg.fused_proj else "qwen3_moe" if cfg.n_experts and cfg.qk_norm
                  else "mixtral" if cfg.n_experts else "qwen3" if cfg.qk_norm else "qwen2" if cfg.qkv_bias
                  else "mistral" if cfg.sliding_window else "llama")
    arch = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
            "mixtral": "MixtralForCausalLM"}[model_type]
    rope: dict[str, Any] = {"rope_type": "default"} if cfg.rope_scaling is None else dict(cfg.rope_scaling)
    rope["rope_theta"] = cfg.rope_theta
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim, "intermediate_size": cfg.expert_ffn_dim if cfg.n_experts else cfg.ffn_dim,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps, "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_embeddings, "rope_theta": cfg.rope_theta, "rope_parameters": rope,
        "attention_dropout": 0.0, "bos_token_id": None, "eos_token_id": None, "torch_dtype": "float32",
    }
    if cfg.rope_scaling is not None:
        out["rope_scaling"] = dict(cfg.rope_scaling)
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    if model_type in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen3":  # one window on every layer (max_window_layers 0), or none
        window = cfg.sliding_window
        out.update(attention_bias=False, use_sliding_window=window is not None, sliding_window=window,
                   max_window_layers=0 if window is not None else cfg.n_layers,
                   layer_types=[("sliding_attention" if window is not None else "full_attention")] * cfg.n_layers)
    if model_type == "phi3":  # one window on every layer, or none; original_max_position_embeddings: longrope's only
        rope["partial_rotary_factor"] = cfg.rope_dim / cfg.head_dim
        original = rope.get("original_max_position_embeddings", cfg.max_seq_len)
        out.pop("rope_scaling", None)  # Phi3Config would take it over rope_parameters
        out.update(attention_bias=False, sliding_window=cfg.sliding_window, resid_pdrop=0.0, embd_pdrop=0.0,
                   original_max_position_embeddings=original, pad_token_id=None)
    if model_type == "qwen2":
        if cfg.sliding_window is not None:
            raise invalid("model.sliding_window", cfg.sliding_window, "null with qkv_bias (Qwen2 export)")
        out.update(use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3_moe":
        window = cfg.sliding_window
        out.update(intermediate_size=cfg.ffn_dim, moe_intermediate_size=cfg.expert_ffn_dim, num_experts=cfg.n_experts,
                   num_experts_per_tok=cfg.top_k, decoder_sparse_step=cfg.moe_every, mlp_only_layers=[],
                   norm_topk_prob=cfg.top_k > 1, router_aux_loss_coef=cfg.aux_loss_coef, output_router_logits=False,
                   attention_bias=False, use_sliding_window=window is not None, sliding_window=window)
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.n_experts, num_experts_per_tok=cfg.top_k, router_aux_loss_coef=cfg.aux_loss_coef,
                   router_jitter_noise=0.0, output_router_logits=False)
    return out
