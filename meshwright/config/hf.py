"""Hugging Face ``config.json`` -> ModelConfig (Llama/Mistral/Mixtral/GPT-2)."""

from __future__ import annotations

from typing import Any

from meshwright.config.io import from_dict
from meshwright.config.schema import ModelConfig
from meshwright.errors import invalid

HF_KEYS = {
    # Hugging Face config.json keys -> ModelConfig fields (LlamaConfig, MistralConfig, MixtralConfig, GPT2Config)
    "vocab_size": "vocab_size", "hidden_size": "d_model", "num_hidden_layers": "n_layers",
    "num_attention_heads": "n_heads", "num_key_value_heads": "n_kv_heads", "intermediate_size": "ffn_hidden",
    "max_position_embeddings": "max_seq_len", "rms_norm_eps": "norm_eps", "rope_theta": "rope_theta",
    "tie_word_embeddings": "tie_embeddings", "num_local_experts": "n_experts", "num_experts_per_tok": "top_k",
    "router_aux_loss_coef": "aux_loss_coef",
    "n_embd": "d_model", "n_layer": "n_layers", "n_head": "n_heads", "n_positions": "max_seq_len",
    "layer_norm_epsilon": "norm_eps", "n_inner": "ffn_hidden",
}


def model_config_from_hf(data: dict[str, Any], name: str = "hf") -> ModelConfig:
    """Map a Hugging Face ``config.json`` (Llama/Mistral/Mixtral/GPT-2) onto a ModelConfig."""
    model_type = data.get("model_type", "")
    if model_type not in ("llama", "mistral", "mixtral", "gpt2"):
        raise invalid("config.json model_type", model_type, "llama, mistral, mixtral or gpt2")
    shape_keys = ("hidden_size", "n_embd", "num_hidden_layers", "n_layer")
    if not any(k in data for k in shape_keys):
        raise invalid("config.json", f"model_type={model_type!r} only", f"a config.json with the model's shape "
                      f"({', '.join(shape_keys[:3])}, ...); defaults are not guessed")
    out: dict[str, Any] = {"name": data.get("_name_or_path") or name, "arch": "gpt2" if model_type == "gpt2" else "llama"}
    for hf_key, ours in HF_KEYS.items():
        if hf_key in data and data[hf_key] is not None:
            out[ours] = data[hf_key]
    if model_type == "gpt2":
        out.setdefault("tie_embeddings", True)
        out.pop("n_kv_heads", None)
    else:
        out.setdefault("tie_embeddings", False)
    if model_type == "mixtral":
        out["moe_ffn_hidden"] = out.pop("ffn_hidden", None)
    return from_dict(ModelConfig, out, prefix="model")
