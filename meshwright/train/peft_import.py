"""A PEFT LoRA adapter directory read into meshwright's model: the inverse of ``meshwright export --peft``.

``lora_config_from_peft(DIR)`` turns ``adapter_config.json`` into our ``LoraConfig`` (PEFT's ``target_modules`` in
Hugging Face names -> ours, ``target_parameters`` on transformers' fused experts -> ``experts.gate_up_proj`` /
``experts.down_proj``, ``modules_to_save`` -> ``output``/``tok_embeddings``); ``load_peft_adapter(model, model_cfg,
DIR)`` fills the adapters of a model adapted with that config from ``adapter_model.safetensors`` (safetensors only:
nothing is unpickled), each tensor converted by the layout ``peft_export.peft_tensors`` writes. What PEFT can express
and we cannot run (DoRA, rsLoRA, bias, per-module ranks, a regex target) is refused in one line, as is an adapter
whose tensors do not match the model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from meshwright.config import LoraConfig, ModelConfig
from meshwright.config.schema import LORA_EXPERT_TARGETS, LORA_SAVABLE, LORA_TARGETS
from meshwright.errors import ConfigError, invalid
from meshwright.train.peft_export import CONFIG_FILE, PREFIX, WEIGHTS_FILE, peft_tensors

_UNSUPPORTED = {"use_dora": False, "use_rslora": False, "fan_in_fan_out": False, "bias": "none",
                "layers_to_transform": None, "lora_bias": False}


def read_adapter_config(path: str | Path) -> dict[str, Any]:
    """``adapter_config.json`` of the PEFT directory ``path``, as a dict (one line if absent or not JSON)."""
    f = Path(path) / CONFIG_FILE
    try:
        config = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise invalid("peft adapter", str(path), f"a PEFT adapter directory with a readable {CONFIG_FILE} "
                      f"({type(e).__name__})") from None
    if not isinstance(config, dict):
        raise invalid(f"{f}", type(config).__name__, "a JSON object")
    return config


def lora_config_from_peft(path: str | Path) -> LoraConfig:
    """Our ``lora:`` section for the PEFT adapter in ``path`` (validated as any ``lora:`` section is)."""
    c = read_adapter_config(path)
    where = f"{Path(path) / CONFIG_FILE}:"
    if c.get("peft_type") != "LORA":
        raise invalid(f"{where}peft_type", c.get("peft_type"), "LORA")
    for key, want in _UNSUPPORTED.items():
        if c.get(key) not in (want, None):
            raise invalid(f"{where}{key}", c.get(key), f"{want!r} (meshwright's LoRA is plain LoRA)")
    for key in ("rank_pattern", "alpha_pattern"):
        if c.get(key):
            raise invalid(f"{where}{key}", c[key], "{} (one rank and alpha for every target)")
    modules = c.get("target_modules") or []
    if isinstance(modules, str):
        raise invalid(f"{where}target_modules", modules, "a list of module names (a regex is not supported)")
    ours = {hf: mine for mine, hf in LORA_TARGETS.items()}
    targets = []
    for t in modules:
        if t not in ours:
            raise invalid(f"{where}target_modules", t, f"one of {', '.join(ours)}")
        targets.append(ours[t])
    for t in c.get("target_parameters") or []:
        match = [e for e in LORA_EXPERT_TARGETS if isinstance(t, str) and (t == e or t.endswith(f".{e}"))]
        if not match:
            raise invalid(f"{where}target_parameters", t, f"one ending in {' or '.join(LORA_EXPERT_TARGETS)} "
                          f"(transformers' fused MoE experts)")
        targets.append(match[0])
    saved_hf = {hf: mine for mine, hf in LORA_SAVABLE.items()}
    saved = []
    for m in c.get("modules_to_save") or []:
        if m not in saved_hf:
            raise invalid(f"{where}modules_to_save", m, f"one of {', '.join(saved_hf)}")
        saved.append(saved_hf[m])
    cfg = LoraConfig(rank=c.get("r"), alpha=c.get("lora_alpha"), targets=list(dict.fromkeys(targets)),
                     dropout=c.get("lora_dropout") or 0.0, modules_to_save=saved)
    cfg.validate("lora")
    return cfg


def read_peft_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """``adapter_model.safetensors`` of the PEFT directory ``path`` (safetensors only: nothing is unpickled)."""
    from safetensors.torch import load_file

    f = Path(path) / WEIGHTS_FILE
    try:
        return load_file(str(f))
    except (OSError, ValueError, RuntimeError) as e:  # safetensors' own errors derive from these
        raise invalid("peft adapter", str(f), f"a readable {WEIGHTS_FILE} ({type(e).__name__})") from None


@torch.no_grad()
def peft_adapter_values(model: nn.Module, model_cfg: ModelConfig, path: str | Path
                        ) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The PEFT adapter in ``path`` in ``model``'s names and layout, whole and fp32: ({parameter name: value}, the PEFT
    keys read). ``model``: the whole model adapted with ``lora_config_from_peft(path)`` (real or on ``meta``: only
    names and shapes are read). Every adapter tensor of the model (and every ``modules_to_save`` weight) must be in the
    file with its shape, and every tensor of the file must be one of the model's."""
    f = Path(path) / WEIGHTS_FILE
    tensors = read_peft_weights(path)
    wanted = peft_tensors(model, model_cfg)
    known = {t.key for t in wanted}
    names = {id(p): n for n, p in model.named_parameters()}
    saved: dict[str, str] = {}  # PEFT key -> our name
    from meshwright.models.hf_weights import _KeyOnlyReader, weight_sources

    sources = weight_sources(model_cfg, _KeyOnlyReader(model_cfg))  # type: ignore[arg-type]
    for name, p in model.named_parameters():  # modules_to_save: trained in full, saved whole
        src = sources.get(name)
        if p.requires_grad and not name.endswith(("lora_A", "lora_B")) and src is not None:
            saved[PREFIX + src.key] = name
    extra = sorted(set(tensors) - known - set(saved))
    if extra:
        raise ConfigError(f"{f}: tensor {extra[0]!r} ({len(extra)} in all) is not an adapter of this model; valid: an "
                          f"adapter for the model config's targets ({', '.join(sorted({t.target for t in wanted}))})")
    values: dict[str, torch.Tensor] = {}
    for t in wanted:
        if t.key not in tensors:
            raise ConfigError(f"{f}: {t.key!r} is missing; valid: an adapter with every tensor of this model's targets")
        value = t.from_peft(tensors[t.key].to(torch.float32))
        if tuple(value.shape) != tuple(t.param.shape):
            raise ConfigError(f"{f}: {t.key!r} has shape {tuple(tensors[t.key].shape)}, the model's adapter needs "
                              f"{tuple(t.to_peft(torch.empty(t.param.shape)).shape)}; valid: an adapter of this model "
                              f"(same sizes, rank and experts)")
        values[names[id(t.param)]] = value
    params = dict(model.named_parameters())
    for key, name in saved.items():
        if key not in tensors:
            raise ConfigError(f"{f}: {key!r} is missing; valid: an adapter that saved every module of its "
                              f"modules_to_save")
        if tuple(tensors[key].shape) != tuple(params[name].shape):
            raise ConfigError(f"{f}: {key!r} has shape {tuple(tensors[key].shape)}, the model's {name} is "
                              f"{tuple(params[name].shape)}; valid: an adapter of this model")
        values[name] = tensors[key].to(torch.float32)
    return values, sorted(tensors)


@torch.no_grad()
def load_peft_adapter(model: nn.Module, model_cfg: ModelConfig, path: str | Path) -> list[str]:
    """Copy the PEFT adapter in ``path`` into ``model`` (adapted with ``lora_config_from_peft(path)``, whole: one
    process); returns the PEFT keys read (``peft_adapter_values`` says what must match)."""
    values, keys = peft_adapter_values(model, model_cfg, path)
    params = dict(model.named_parameters())
    for name, value in values.items():
        params[name].copy_(value.to(params[name].dtype))
    return keys
