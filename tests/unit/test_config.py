"""Config validation: presets load, YAML round-trips, and bad input gives one-line errors naming key and value."""

import json

import pytest

from meshwright.config import (ClusterSpec, ModelConfig, TrainConfig, load_cluster, load_model_config,
                               load_train_config, parse_override, preset_names)
from meshwright.errors import ConfigError
from meshwright.config.io import dump_yaml, from_dict, to_dict


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("kind,loader", [("models", load_model_config), ("clusters", load_cluster)])
def test_every_preset_loads(kind, loader):
    names = preset_names(kind)
    assert names
    for name in names:
        loader(name)


def test_train_presets_load_and_round_trip():
    assert {"default", "tiny-test"} <= set(preset_names("train"))
    for name in preset_names("train"):
        cfg = load_train_config(name)
        again = from_dict(TrainConfig, to_dict(cfg))
        assert again == cfg
    import yaml

    cfg = load_train_config("default")
    assert from_dict(TrainConfig, yaml.safe_load(dump_yaml(cfg))) == cfg


def test_overrides_are_dotted_and_typed():
    cfg = load_train_config("tiny-test", dict([parse_override("steps=7"), parse_override("data.max_files=3"),
                                               parse_override("lr=1e-3")]))
    assert cfg.steps == 7 and cfg.data.max_files == 3 and cfg.lr == pytest.approx(1e-3)


@pytest.mark.parametrize("data,needle", [
    ({"stepz": 3}, "stepz is not a known key"),
    ({"steps": "many"}, "steps='many' is invalid; valid: an integer"),
    ({"steps": -1}, "steps=-1 is invalid"),
    ({"global_batch": 6, "micro_batch": 4}, "global_batch=6 is invalid; valid: a multiple of micro_batch=4"),
    ({"lr": 1e-3, "min_lr": 1e-2}, "min_lr=0.01 is invalid"),
    ({"nan_policy": "ignore"}, "nan_policy='ignore' is invalid; valid: one of 'stop', 'skip'"),
    ({"data": {"val_fraction": 0.9}}, "data.val_fraction=0.9 is invalid"),
    ({"model": "no-such-model"}, "model='no-such-model' is not a known preset"),
])
def test_bad_train_config_is_one_line(data, needle):
    with pytest.raises(ConfigError) as exc:
        load_train_config(data)
    assert needle in one_line(exc)


def test_bad_model_and_cluster_are_one_line():
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {"d_model": 128, "n_heads": 5}, prefix="model")
    assert "model.n_heads=5 is invalid; valid: a divisor of d_model=128" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        from_dict(ModelConfig, {"n_heads": 4, "n_kv_heads": 3}, prefix="model")
    assert "n_kv_heads=3" in one_line(exc)
    with pytest.raises(ConfigError) as exc:
        from_dict(ClusterSpec, {"peak_tflops": {"int4": 1.0}}, prefix="cluster")
    assert "cluster.peak_tflops.int4=1.0 is invalid" in one_line(exc)


def test_hf_config_json(tmp_path):
    llama = {"model_type": "llama", "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
             "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
             "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    cfg = load_model_config(str(tmp_path / "config.json"))
    assert cfg.num_params() == load_model_config("llama2-7b").num_params() == 6_738_415_616
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    (tmp_path / "gpt2.json").write_text(json.dumps(gpt2))
    assert load_model_config(str(tmp_path / "gpt2.json")).num_params() == 124_439_808
