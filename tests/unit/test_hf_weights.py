"""Hugging Face weights in and out: tiny random transformers models saved with save_pretrained, loaded with
``from_pretrained``/``init_from``; logits must match transformers' to 1e-4 in fp32 (no network)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.config import load_model_config  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import from_pretrained, load_pretrained_into  # noqa: E402
from meshwright.config.hf import model_config_from_hf  # noqa: E402
from meshwright.models.decoder import Decoder  # noqa: E402

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)
PHI3_TOKENS = dict(pad_token_id=None, bos_token_id=None, eos_token_id=None)  # Phi3Config's defaults are ids >= 97


def _build(kind: str):
    T = transformers
    torch.manual_seed(0)
    if kind == "llama":
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL))
    if kind == "llama3":  # Llama 3.1 rope scaling, theta 500000, tied embeddings, head_dim != hidden/heads
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16, "rope_theta": 500000.0}
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters=rope, tie_word_embeddings=True, head_dim=12))
    if kind == "llama_linear":  # linear rope scaling 
        return T.LlamaForCausalLM(T.LlamaConfig(**SMALL, rope_parameters={"rope_type": "linear", "factor": 4.0,
                                                                           "rope_theta": 20000.0}))
    if kind == "mistral":
        return T.MistralForCausalLM(T.MistralConfig(**SMALL, sliding_window=5))
    if kind == "qwen2":
        return T.Qwen2ForCausalLM(T.Qwen2Config(**SMALL))
    if kind == "qwen3":  # q/k head norms, head_dim != hidden/heads, tied embeddings
        return T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, head_dim=12, tie_word_embeddings=True))
    if kind == "qwen3_window":  # a sliding window on every layer
        return T.Qwen3ForCausalLM(T.Qwen3Config(**SMALL, use_sliding_window=True, sliding_window=5, max_window_layers=0))
    if kind == "qwen3_moe":  # experts in every 2nd block (dense ones between), top-2 renormalised, head_dim apart
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**SMALL, head_dim=12, moe_intermediate_size=24, num_experts=4,
                                                      num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2))
    if kind == "qwen3_moe_top1":  # one expert per token, gated by its raw probability (norm_topk_prob false)
        return T.Qwen3MoeForCausalLM(T.Qwen3MoeConfig(**SMALL, moe_intermediate_size=24, num_experts=4,
                                                      num_experts_per_tok=1, norm_topk_prob=False))
    if kind == "phi3":  # fused qkv_proj and gate_up_proj (Phi-3-mini-4k, Phi-4 without the window)
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **PHI3_TOKENS))
    if kind == "phi3_window":  # Phi-3-mini's window on every layer, head_dim != hidden/heads, tied embeddings
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **PHI3_TOKENS, sliding_window=5, head_dim=12,
                                              tie_word_embeddings=True))
    if kind == "phi3_longrope":  # Phi-3.5-mini's rope: short factors up to 16 tokens, long ones past (the tests run 24)
        rope = {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0], "long_factor": [1.5, 3.0, 6.0, 9.0],
                "rope_theta": 10000.0}
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **PHI3_TOKENS, original_max_position_embeddings=16,
                                              rope_parameters=rope))
    if kind == "phi3_partial":  # Phi-4-mini's rope: longrope on the first 3/4 of each head (6 of 8), tied embeddings
        rope = {"rope_type": "longrope", "short_factor": [1.0, 1.5, 2.0], "long_factor": [2.0, 5.0, 9.0],
                "rope_theta": 10000.0, "partial_rotary_factor": 0.75}
        return T.Phi3ForCausalLM(T.Phi3Config(**SMALL, **PHI3_TOKENS, original_max_position_embeddings=16,
                                              rope_parameters=rope, tie_word_embeddings=True))
    if kind == "mixtral":
        return T.MixtralForCausalLM(T.MixtralConfig(**SMALL, num_local_experts=4, num_experts_per_tok=2))
    if kind == "gpt2":
        return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=64))
    raise ValueError(kind)


def _perturb(model: torch.nn.Module) -> None:
    """Random init leaves biases/norms at 0/1; perturb them so the test sees every tensor's mapping."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))


def _saved(kind: str, tmp_path, max_shard_size=None):
    hf = _build(kind).eval()
    _perturb(hf)
    out = tmp_path / kind
    hf.save_pretrained(out, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    return hf, out


@pytest.mark.parametrize("kind", ["llama", "llama3", "llama_linear", "mistral", "qwen2", "qwen3", "qwen3_window",
                                  "qwen3_moe", "qwen3_moe_top1", "phi3", "phi3_window", "phi3_longrope", "phi3_partial",
                                  "mixtral", "gpt2"])
def test_from_pretrained_matches_transformers_logits(kind, tmp_path):
    hf, path = _saved(kind, tmp_path)
    ours = from_pretrained(path).eval()
    tokens = torch.randint(0, 97, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    assert got.shape == want.shape
    assert (got - want).abs().max().item() < 1e-4


def test_config_import_keeps_what_the_file_says(tmp_path):
    _, path = _saved("llama3", tmp_path)
    cfg = load_model_config(str(path / "config.json"))
    assert cfg.rope_theta == 500000.0
    assert cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    assert cfg.tie_embeddings and cfg.head_dim == 12 and cfg.attn_head_dim == 12
    _, path = _saved("mistral", tmp_path)
    assert load_model_config(str(path / "config.json")).sliding_window == 5
    _, path = _saved("qwen2", tmp_path)
    assert load_model_config(str(path / "config.json")).qkv_bias
    _, path = _saved("qwen3", tmp_path)
    cfg = load_model_config(str(path / "config.json"))
    assert cfg.qk_norm and not cfg.qkv_bias and cfg.head_dim == 12 and cfg.tie_embeddings and cfg.sliding_window is None
    _, path = _saved("qwen3_window", tmp_path)
    assert load_model_config(str(path / "config.json")).sliding_window == 5
    _, path = _saved("phi3_window", tmp_path)
    cfg = load_model_config(str(path / "config.json"))
    assert cfg.fused_proj and cfg.sliding_window == 5 and cfg.head_dim == 12 and cfg.tie_embeddings
    assert cfg.rope_scaling is None and not cfg.qkv_bias and not cfg.qk_norm


@pytest.mark.parametrize("kind,change,field", [
    ("qwen3", {"use_sliding_window": True, "sliding_window": 5, "max_window_layers": 1, "layer_types": None},
     "max_window_layers"),  # windows on some layers only
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types"),
    ("qwen3", {"attention_bias": True}, "attention_bias"),
    ("qwen3", {"model_type": "qwen3_next"}, "model_type"),
    ("qwen3_moe", {"mlp_only_layers": [0]}, "mlp_only_layers"),  # a dense block off decoder_sparse_step's rule
    ("qwen3_moe", {"norm_topk_prob": False}, "norm_topk_prob"),  # raw top-2 probabilities as gates
])
def test_unsupported_qwen3_config_is_a_one_line_error(kind, change, field, tmp_path):
    _, path = _saved(kind, tmp_path)
    data = json.loads((path / "config.json").read_text())
    data.update(change)
    with pytest.raises(ConfigError) as err:
        load_model_config(_write(path, data))
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind,change,message", [
    ("qwen3", {"head_dim": 13}, "model.attn_head_dim=13 is invalid; valid: an even integer"),  # blamed d_model=32
    ("qwen3", {"model_type": None}, "config.json model_type=None is invalid; valid: llama"),  # model.architectures
    ("qwen3", {"hidden_size": None}, "config.json hidden_size=None is invalid; valid: the model's own value"),  # shapes
    ("qwen3_moe", {"intermediate_size": None}, "config.json intermediate_size=None is invalid"),  # blamed on weights
    ("qwen3", {"layer_types": ["full_attention"] * 3}, "config.json layer_types='3 entries' is invalid; valid: one "
                                                        "per layer: num_hidden_layers=2"),  # accepted
    ("qwen3_moe", {"num_experts_per_tok": 0}, "model.top_k=0 is invalid"),  # blamed norm_topk_prob=True
    ("qwen3_moe", {"norm_topk_prob": "yes"}, "config.json norm_topk_prob='yes' is invalid; valid: true or false"),
])
def test_odd_qwen3_config_values_name_their_own_key(kind, change, message, tmp_path):
    """A hand-edited config.json: the one line names the key that is wrong, not a neighbour ("yes" was read as
    true; a config.json without model_type was read as meshwright's own model YAML)."""
    _, path = _saved(kind, tmp_path)
    data = {k: v for k, v in json.loads((path / "config.json").read_text()).items() if k not in change}
    data.update({k: v for k, v in change.items() if v is not None})
    with pytest.raises(ConfigError) as err:
        load_model_config(_write(path, data))
    assert str(err.value).startswith(message) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen3"])
def test_qwen3_window_without_its_size_is_transformers_default(kind, tmp_path):
    """use_sliding_window with no sliding_window key: transformers windows every layer at Qwen3(Moe)Config's 4096;
    the MoE import ran full attention, the dense one refused the file."""
    _, path = _saved(kind, tmp_path)
    data = {k: v for k, v in json.loads((path / "config.json").read_text()).items()
            if k not in ("sliding_window", "layer_types")}
    data.update(use_sliding_window=True, max_window_layers=0)
    cfg = load_model_config(_write(path, data))
    assert cfg.sliding_window == transformers.AutoConfig.from_pretrained(path).sliding_window == 4096


LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 1e4,
            "partial_rotary_factor": 1.0}


@pytest.mark.parametrize("change,field", [
    ({"rope_parameters": {**LONGROPE, "rope_type": "dynamic"}}, "rope_parameters.rope_type"),  # Phi3Config refuses it
    ({"rope_parameters": None, "rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type"),
    ({"rope_parameters": LONGROPE, "original_max_position_embeddings": None}, "original_max_position_embeddings"),
    ({"rope_parameters": {**LONGROPE, "rope_type": "default", "partial_rotary_factor": 0.625}},
     "rope_parameters.partial_rotary_factor"),  # 5 of 8 dimensions: transformers would rotate 6 (pairs)
    ({"partial_rotary_factor": 1.5, "rope_parameters": None}, "partial_rotary_factor"),
    ({"attention_bias": True}, "attention_bias"),
])
def test_unsupported_phi3_config_is_a_one_line_error(change, field, tmp_path):
    _, path = _saved("phi3", tmp_path)
    data = json.loads((path / "config.json").read_text())
    data.update(change)
    with pytest.raises(ConfigError) as err:
        load_model_config(_write(path, data))
    assert f"config.json {field}=" in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("kind, change", [
    ("gpt2", {}),  # GPT2Config's own 0.1 for all three
    ("llama", {"attention_dropout": 0.1}),
    ("qwen3", {"attention_dropout": 0.2}),
    ("mixtral", {"attention_dropout": 0.3}),
    ("phi3", {"resid_pdrop": 0.1, "embd_pdrop": 0.2, "attention_dropout": 0.05}),  # refused while llama/gpt2 loaded
])
def test_dropout_keys_are_never_imported_and_said_in_one_note_for_every_family(kind, change, tmp_path, capsys,
                                                                             monkeypatch):
    """One rule for every family: a config's dropouts are how it was pretrained, not the model; the run's dropout is
    model.dropout (0 unless set), and non-zero keys are named in one note line (once per process), never an error."""
    import meshwright.config.hf as hf_config

    monkeypatch.setattr(hf_config, "_said", set())
    _, path = _saved(kind, tmp_path)
    data = {**json.loads((path / "config.json").read_text()), **change}
    keys = {k: v for k, v in data.items() if k in hf_config.DROPOUT_KEYS and v}
    assert keys, data  # each case has a non-zero dropout key to say
    capsys.readouterr()
    cfg = load_model_config(_write(path, data))
    assert cfg.dropout == 0.0
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip()]
    assert len(err) == 1 and err[0].startswith("note: config.json ") and "not imported" in err[0], err
    assert all(f"{k}={v!r}" in err[0] for k, v in keys.items()) and "model.dropout" in err[0]
    load_model_config(_write(path, data))  # read again (validation, then the run): said once
    assert not capsys.readouterr().err.strip()
    load_model_config(_write(path, {**data, **{k: 0.0 for k in keys}}))  # zeros: nothing to say
    assert not capsys.readouterr().err.strip()
    ours = from_pretrained(path, cfg=cfg).train()  # training mode: no dropout drawn, the same logits twice
    tokens = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(ours(tokens), ours(tokens))


def test_phi3_longrope_factors_of_another_length_are_one_line(tmp_path):
    _, path = _saved("phi3_longrope", tmp_path)
    data = json.loads((path / "config.json").read_text())
    data["rope_parameters"]["long_factor"] = [2.0] * 5
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.long_factor='5 numbers' is invalid; valid: "
                                          r"rotary_dim/2=4 numbers") as err:
        load_model_config(_write(path, data))
    assert "\n" not in str(err.value)
    data["rope_parameters"]["long_factor"] = [2.0, -1.0, 2.0, 2.0]
    with pytest.raises(ConfigError, match=r"model\.rope_scaling\.long_factor=\[2\.0, -1\.0"):
        load_model_config(_write(path, data))


def test_phi3_longrope_picks_its_factors_by_sequence_length_like_transformers(tmp_path):
    """transformers' longrope uses the short factors up to original_max_position_embeddings tokens (16 here) and the
    long ones past it, with cos/sin scaled by sqrt(1 + ln(64/16)/ln 16) either way: our logits equal its own at 12, 16,
    17 and 40 tokens (each set of factors alone fails one side); the scale stays the file's when model.max_seq_len is
    overridden; transformers 4's config.json (rope_scaling type su, the original length at the top level) reads
    alike."""
    import dataclasses
    import math

    hf, path = _saved("phi3_longrope", tmp_path)
    cfg = load_model_config(str(path / "config.json"))
    assert cfg.rope_scaling["attention_factor"] == pytest.approx(math.sqrt(1 + math.log(4) / math.log(16)))
    data = json.loads((path / "config.json").read_text())
    rope = data.pop("rope_parameters")
    old = {**data, "original_max_position_embeddings": 16, "rope_theta": rope["rope_theta"],
           "rope_scaling": {"type": "su", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}}
    assert model_config_from_hf(old, name=cfg.name) == cfg
    longer = dataclasses.replace(cfg, max_seq_len=48)
    for model in (from_pretrained(path).eval(), from_pretrained(path, cfg=longer).eval()):
        for seq in (12, 16, 17, 40):
            tokens = torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(seq))
            with torch.no_grad():
                assert (model(tokens) - hf(tokens).logits).abs().max().item() < 1e-4, seq


def test_phi3_partial_rotary_reads_where_phi4_mini_writes_it(tmp_path):
    """Phi-4-mini's config.json (transformers 4) has partial_rotary_factor at the top level and rope_scaling without it;
    it imports to the same rotary_dim (6 of 8) as transformers 5's rope_parameters, and a 12-token batch (short
    factors) matches too."""
    hf, path = _saved("phi3_partial", tmp_path)
    cfg = load_model_config(str(path / "config.json"))
    assert cfg.rotary_dim == 6 and cfg.rope_dim == 6 and cfg.head_dim == 8 and len(cfg.rope_scaling["long_factor"]) == 3
    data = json.loads((path / "config.json").read_text())
    rope = data.pop("rope_parameters")
    old = {**data, "partial_rotary_factor": 0.75, "original_max_position_embeddings": 16, "rope_theta": 1e4,
           "rope_scaling": {"type": "longrope", "short_factor": rope["short_factor"], "long_factor": rope["long_factor"]}}
    assert model_config_from_hf(old, name=cfg.name) == cfg
    tokens = torch.randint(0, 97, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert (from_pretrained(path).eval()(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_fused_phi3_tensor_of_another_size_is_refused(tmp_path):
    """q/k/v and gate/up read row blocks of qkv_proj and gate_up_proj: a fused tensor with extra rows is refused, not
    silently cut to the blocks the model reads."""
    from safetensors.torch import load_file, save_file

    _, path = _saved("phi3", tmp_path)
    for key, rows in (("model.layers.1.self_attn.qkv_proj.weight", 64), ("model.layers.0.mlp.gate_up_proj.weight", 96)):
        state = load_file(str(path / "model.safetensors"))
        state[key] = torch.cat([state[key], state[key][:8]])
        save_file(state, str(tmp_path / "model.safetensors"))
        (tmp_path / "config.json").write_text((path / "config.json").read_text())
        with pytest.raises(ConfigError, match=rf"{rows}, 32\) in the model, {key} has \({rows + 8}, 32\)") as err:
            from_pretrained(tmp_path)
        assert "\n" not in str(err.value)


def _write(path, data) -> str:
    (path / "config.json").write_text(json.dumps(data))
    return str(path / "config.json")


def test_sharded_checkpoint_and_unsharded_load_equal(tmp_path):
    hf, path = _saved("llama", tmp_path, max_shard_size="20KB")
    assert (path / "model.safetensors.index.json").is_file()
    ours = from_pretrained(path).eval()
    tokens = torch.randint(0, 97, (1, 16))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_pipeline_stage_reads_only_its_layers(tmp_path):
    _, path = _saved("llama", tmp_path)
    full = from_pretrained(path)
    cfg = full.cfg
    stage = Decoder(cfg)
    del stage.layers["0"]
    stage.tok_embeddings = None
    names = load_pretrained_into(stage, path, cfg)
    assert not any(n.startswith("layers.0.") or n.startswith("tok_embeddings") for n in names)
    for name, p in stage.named_parameters():
        assert torch.equal(p, full.get_parameter(name)), name


@pytest.mark.parametrize("change,field", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}}, "rope_type"),
    ({"attention_bias": True}, "attention_bias"),
    ({"model_type": "phi"}, "model_type"),
])
def test_unsupported_config_is_a_one_line_error(change, field, tmp_path):
    _, path = _saved("llama", tmp_path)
    data = json.loads((path / "config.json").read_text())
    data.update(change)
    (path / "config.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError) as err:
        load_model_config(str(path / "config.json"))
    assert field in str(err.value) and "\n" not in str(err.value)


def test_unused_checkpoint_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = _saved("llama", tmp_path)
    state = load_file(str(path / "model.safetensors"))
    state["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(32)
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ConfigError, match="no place for"):
        from_pretrained(path)


@pytest.mark.parametrize("kind", ["llama3", "mistral", "qwen2", "qwen3", "qwen3_window", "qwen3_moe", "qwen3_moe_top1",
                                  "phi3", "phi3_window", "phi3_longrope", "phi3_partial", "mixtral", "gpt2"])
def test_save_hf_round_trip_through_transformers(kind, tmp_path):
    from meshwright.models.hf_weights import save_hf

    hf, path = _saved(kind, tmp_path)
    ours = from_pretrained(path)
    out = save_hf(ours, ours.cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    tokens = torch.randint(0, 97, (2, 24))
    with torch.no_grad():
        assert (back(tokens).logits - hf(tokens).logits).abs().max().item() < 1e-4


def test_tied_checkpoint_that_also_stores_the_head_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    hf, path = _saved("llama3", tmp_path)  # tie_word_embeddings=True
    state = load_file(str(path / "model.safetensors"))
    state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
    save_file(state, str(path / "model.safetensors"))
    ours = from_pretrained(path).eval()
    tokens = torch.randint(0, 97, (1, 12))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() < 1e-4


def test_untied_checkpoint_without_its_head_is_refused(tmp_path):
    """tie_word_embeddings=false and no lm_head.weight: the head used to be loaded from the embedding, a model
    other than the checkpoint's, silently."""
    from safetensors.torch import load_file, save_file

    _, path = _saved("llama", tmp_path)  # untied
    state = load_file(str(path / "model.safetensors"))
    del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"))
    with pytest.raises(ConfigError) as err:
        from_pretrained(path)
    assert "\n" not in str(err.value) and "has no 'lm_head.weight' and config.json tie_word_embeddings=false" in str(err.value)


def test_transformers4_config_keys_are_read():
    from meshwright.config.hf import model_config_from_hf

    data = {"model_type": "llama", "vocab_size": 97, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
            "intermediate_size": 48, "max_position_embeddings": 64, "rope_theta": 500000.0,
            "rope_scaling": {"type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                             "original_max_position_embeddings": 16}}
    cfg = model_config_from_hf(data)
    assert cfg.rope_theta == 500000.0 and cfg.rope_scaling["rope_type"] == "llama3" and cfg.rope_scaling["factor"] == 8.0
    data["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    with pytest.raises(ConfigError, match="rope_type"):
        model_config_from_hf(data)


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-8b"])
def test_qwen3_presets_are_the_published_shapes(preset):
    """The presets' config.json (export mapping) builds transformers' Qwen3 with the parameters our model has (on the
    meta device: no memory), and imports back to the same ModelConfig."""
    import dataclasses

    from meshwright.config.hf import hf_config_from_model, model_config_from_hf

    cfg = load_model_config(preset)
    data = hf_config_from_model(cfg)
    assert data["model_type"] == "qwen3" and data["head_dim"] == 128
    with torch.device("meta"):
        theirs = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**data))
        ours = Decoder(cfg)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_theirs == cfg.num_params() == sum(p.numel() for p in set(ours.parameters()))
    assert {"qwen3-0.6b": 596_049_920, "qwen3-8b": 8_190_735_360}[preset] == n_theirs  # 0.6B and 8.2B on the model cards
    back = model_config_from_hf(data, name=preset)  # head_dim 128 = d_model/n_heads at 8B: not kept apart there
    assert back.head_dim == cfg.head_dim and dataclasses.replace(back, attn_head_dim=cfg.attn_head_dim) == cfg


# microsoft/phi-4's config.json (its model-specific keys, as published; transformers 4.47 wrote it)
PHI4_CONFIG = {"architectures": ["Phi3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
               "bos_token_id": 100257, "embd_pdrop": 0.0, "eos_token_id": 100257, "hidden_act": "silu", "hidden_size": 5120,
               "initializer_range": 0.02, "intermediate_size": 17920, "max_position_embeddings": 16384,
               "model_type": "phi3", "num_attention_heads": 40, "num_hidden_layers": 40, "num_key_value_heads": 10,
               "original_max_position_embeddings": 16384, "pad_token_id": 100257, "resid_pdrop": 0.0, "rms_norm_eps": 1e-05,
               "rope_scaling": None, "rope_theta": 250000, "sliding_window": None, "tie_word_embeddings": False,
               "torch_dtype": "bfloat16", "use_cache": True, "vocab_size": 100352}


def test_phi4_preset_is_the_published_shape():
    """The phi-4 preset is what microsoft/phi-4's config.json imports to, and its export config.json builds
    transformers' Phi3ForCausalLM (on the meta device: no memory) with the parameters our model has: 14.66B."""
    import dataclasses

    from meshwright.config.hf import hf_config_from_model, model_config_from_hf

    cfg = load_model_config("phi-4")
    assert dataclasses.replace(model_config_from_hf(PHI4_CONFIG), name="phi-4") == cfg
    data = hf_config_from_model(cfg)
    assert data["model_type"] == "phi3" and data["architectures"] == ["Phi3ForCausalLM"]
    with torch.device("meta"):
        theirs = transformers.Phi3ForCausalLM(transformers.Phi3Config(**data))
        ours = Decoder(cfg)
    n_theirs = sum(p.numel() for p in theirs.parameters())
    assert n_theirs == cfg.num_params() == sum(p.numel() for p in set(ours.parameters())) == 14_659_507_200


@pytest.mark.parametrize("change", [{"qk_norm": True}, {"qkv_bias": True}, {"n_experts": 4},
                                    {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, {"arch": "gpt2"},
                                    {"rotary_dim": 16, "fused_proj": False}])
def test_fused_proj_without_a_phi3_to_hold_it_is_one_line(change):
    """fused_proj exports Phi3ForCausalLM (dense, no biases or head norms, default rope): a model it cannot hold is
    refused in one line naming the field, when loaded (gpt2 blocks) or exported (the rest), never written as another
    architecture."""
    from meshwright.config.hf import hf_config_from_model

    base = {"name": "p", "n_heads": 4, "n_kv_heads": 2, "fused_proj": True, **change}
    with pytest.raises(ConfigError, match="fused_proj") as err:
        hf_config_from_model(load_model_config(base))
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("rotary_dim", [7, 0, 34])
def test_rotary_dim_is_even_and_within_the_head(rotary_dim):
    with pytest.raises(ConfigError, match=rf"model\.rotary_dim={rotary_dim} is invalid; valid: an even number in "
                                          rf"2\.\.head_dim=32") as err:
        load_model_config({"name": "p", "n_heads": 4, "rotary_dim": rotary_dim})
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("kind", ["mixtral", "qwen3_moe"])
def test_imported_moe_adds_no_router_z_loss_its_source_never_trained_with(kind):
    """Mixtral and Qwen3-MoE train with the load-balancing loss alone (router_aux_loss_coef): an import that kept
    meshwright's default z-loss (0.001) would fine-tune a different objective and log a loss transformers can't match."""
    from meshwright.config.hf import model_config_from_hf

    data = _build(kind).config.to_dict()
    cfg = model_config_from_hf(data)
    assert cfg.z_loss_coef == 0.0 and cfg.aux_loss_coef == data["router_aux_loss_coef"]
