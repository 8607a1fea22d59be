"""Resolve presets (``configs/models|clusters|train/*.yaml``), files and inline mappings into validated
configs, once; command-line ``key=value`` overrides."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from meshwright.config.hf import model_config_from_hf
from meshwright.config.io import from_dict, load_yaml, read_mapping, to_dict
from meshwright.config.schema import ClusterSpec, ModelConfig, TrainConfig
from meshwright.errors import ConfigError, invalid

CONFIG_ROOT = Path(os.environ.get("MESHWRIGHT_CONFIGS", Path(__file__).resolve().parents[2] / "configs"))


def preset_names(kind: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_ROOT / kind).glob("*.yaml"))


def _resolve(kind: str, ref: str) -> Path:
    label = {"models": "model", "clusters": "cluster"}.get(kind, "train config")
    path = Path(ref)
    if path.suffix in (".yaml", ".yml", ".json") or path.exists():
        if not path.is_file():
            raise ConfigError(f"{label}={ref!r} is not an existing file; valid: a path or one of {', '.join(preset_names(kind))}")
        return path
    preset = CONFIG_ROOT / kind / f"{ref}.yaml"
    if not preset.is_file():
        raise ConfigError(f"{label}={ref!r} is not a known preset; valid: {', '.join(preset_names(kind))} or a file path")
    return preset


def preset_path(kind: str, ref: str) -> Path:
    """The file a config reference names: a path, or a preset of ``configs/<kind>`` (models, clusters, train)."""
    return _resolve(kind, ref)


def model_config_path(ref: str) -> Path:
    """The file a model reference names: a preset, a YAML/JSON path, or a Hugging Face checkpoint directory's
    config.json (`plan --model DIR`: plan from the checkpoint you will fine-tune with ``init_from: DIR``)."""
    path = Path(ref)
    if path.is_dir():
        config_json = path / "config.json"
        if not config_json.is_file():
            raise invalid("model", ref, f"a Hugging Face checkpoint directory holding config.json (this one has none), "
                          f"a YAML/JSON path or a preset ({', '.join(preset_names('models'))})")
        return config_json
    return _resolve("models", ref)


def load_model_config(ref: str | dict[str, Any] | ModelConfig) -> ModelConfig:
    """Preset name, YAML path, HF config.json path or checkpoint directory, or inline mapping -> validated
    ModelConfig (an HF config is named after its directory, as ``init_from`` names it)."""
    if isinstance(ref, ModelConfig):
        return ref
    if isinstance(ref, dict):
        return from_dict(ModelConfig, ref, prefix="model")
    path = model_config_path(ref)
    data = read_mapping(path)
    if "model_type" in data or "architectures" in data:  # a config.json whose model_type went missing is named so
        return model_config_from_hf(data, name=path.parent.name if path.name == "config.json" else path.stem)
    return from_dict(ModelConfig, data, prefix="model")


def load_cluster(ref: str | dict[str, Any] | ClusterSpec, nodes: int | None = None,
                 devices_per_node: int | None = None) -> ClusterSpec:
    """Preset name, path or mapping -> ClusterSpec, optionally resized to ``nodes`` x ``devices_per_node``."""
    if isinstance(ref, ClusterSpec):
        spec = ref
    elif isinstance(ref, dict):
        spec = from_dict(ClusterSpec, ref, prefix="cluster")
    else:
        spec = from_dict(ClusterSpec, read_mapping(_resolve("clusters", ref)), prefix="cluster")
    changes: dict[str, int] = {}
    if nodes is not None:
        changes["nodes"] = nodes
    if devices_per_node is not None:
        changes["devices_per_node"] = devices_per_node
    if changes:
        spec = dataclasses.replace(spec, **changes)
        spec.validate("cluster")
    return spec


def load_train_config(ref: str | Path | dict[str, Any] | None = None, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """Train config from a preset name (``configs/train``), a path, or a mapping, plus dotted overrides."""
    if ref is None:
        data: dict[str, Any] = {}
    elif isinstance(ref, dict):
        data = dict(ref)
    else:
        data = read_mapping(_resolve("train", str(ref)))
    for key, value in (overrides or {}).items():
        target = data
        parts = key.split(".")
        for part in parts[:-1]:
            parent = target.setdefault(part, {})
            if not isinstance(parent, dict):
                raise invalid(key, value, f"a key whose parents are mappings ({part}={parent!r} here; set {part} "
                              f"as a whole, e.g. {part}={{...}})")
            target = parent
        target[parts[-1]] = value
    cfg = from_dict(TrainConfig, data)
    if cfg.init_from is None or not isinstance(cfg.model, dict):
        # fail early, with the model's own field names; with init_from a mapping only overrides the checkpoint's
        # config.json and is checked merged with it (train/build.resolve_model_config), not as a whole model
        load_model_config(cfg.model)
    load_cluster(cfg.cluster)
    return cfg


def parse_override(text: str) -> tuple[str, Any]:
    """``key=value`` from the command line; the value is parsed as YAML (so 3e-4, true, [1,2] work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"override={text!r} is invalid; valid: KEY=VALUE, e.g. steps=100")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override={text!r} is invalid; valid: KEY=VALUE with a field name before '=', e.g. steps=100")
    if not raw.strip():  # YAML reads '' as null: `init_from=$CKPT` with CKPT unset trained from scratch, silently
        raise invalid("override", text, f"{key.strip()}=VALUE, or {key.strip()}=null to clear the field (an empty "
                      f"value is refused: an unset shell variable?)")
    try:
        value = load_yaml(raw)  # duplicate keys and alias bombs refused here too
    except yaml.YAMLError:
        value = raw
    return key.strip(), value


def config_json(obj: Any) -> str:
    return json.dumps(to_dict(obj), sort_keys=True)
