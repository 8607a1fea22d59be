"""Configs: dataclass schemas, YAML/JSON io, presets and overrides, Hugging Face config mapping."""

from meshwright.config.hf import HF_KEYS, model_config_from_hf
from meshwright.config.presets import (
                                       CONFIG_ROOT,
                                       config_json,
                                       load_cluster,
                                       load_model_config,
                                       load_train_config,
                                       parse_override,
                                       preset_names,
)
from meshwright.config.schema import ClusterSpec, DataConfig, LoraConfig, MeftConfig, ModelConfig, TrainConfig, divisors

__all__ = ["CONFIG_ROOT", "HF_KEYS", "ClusterSpec", "DataConfig", "LoraConfig", "MeftConfig", "ModelConfig", "TrainConfig",
           "config_json", "divisors", "load_cluster", "load_model_config", "load_train_config", "model_config_from_hf",
           "parse_override", "preset_names"]
