"""Gemma, Gemma 2, Gemma 3 (text, and the multimodal config's text model) in and out: tiny random transformers models
saved with save_pretrained; meshwright's logits must equal transformers' to 1e-5 in fp32, on sequences longer than
the sliding window, and transformers must load meshwright's export back to the same logits (no network)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.config import ModelConfig  # noqa: E402
from meshwright.config.hf import hf_config_from_model, model_config_from_hf  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.models import from_pretrained  # noqa: E402
from meshwright.models.decoder import Decoder, count_parameters  # noqa: E402
from meshwright.models.hf_weights import save_hf  # noqa: E402

# head_dim 12 != hidden/heads (32/4), GQA, a window of 5 on sequences of 24; 6 layers so Gemma 3's 1-in-6 full layer
# and Gemma 2's alternation both occur
SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
             num_key_value_heads=2, head_dim=12, max_position_embeddings=64, pad_token_id=None, bos_token_id=None,
             eos_token_id=None)
TOL = 1e-5  # fp32; measured max |diff| is ~1e-6 (the rotary layouts differ in summation order only)


def _build(kind: str):
    T = transformers
    torch.manual_seed(0)
    if kind == "gemma":
        return T.GemmaForCausalLM(T.GemmaConfig(**SMALL))
    if kind == "gemma2":  # caps 50/30 (the class defaults, smaller here so they bite), scalar 16 != head_dim
        cfg = T.Gemma2Config(**SMALL, sliding_window=5, query_pre_attn_scalar=16, attn_logit_softcapping=2.0,
                             final_logit_softcapping=3.0)
        return T.Gemma2ForCausalLM(cfg)
    if kind == "gemma3":  # window on 5 of 6 layers, local base 10000, linear scaling 8 on the full layer, untied
        rope = {"full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0}}
        cfg = T.Gemma3TextConfig(**SMALL, sliding_window=5, query_pre_attn_scalar=16, rope_parameters=rope,
                                 tie_word_embeddings=False)
        return T.Gemma3ForCausalLM(cfg)
    if kind == "gemma3_capped":  # Gemma 3 with a final-logit cap (Gemma3ForCausalLM applies it when set)
        return T.Gemma3ForCausalLM(T.Gemma3TextConfig(**SMALL, sliding_window=5, final_logit_softcapping=3.0))
    raise ValueError(kind)


def _perturb(model: torch.nn.Module) -> None:
    """Norm weights start at 0 ((1 + w) norms): perturb every 1-d tensor so the test sees each one's mapping; the
    matrices x8 (std 0.16) so scores and logits reach the caps (at init they stay far below them)."""
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn_like(p))
            else:
                p.mul_(8.0)


def _saved(kind: str, tmp_path):
    hf = _build(kind).eval()
    _perturb(hf)
    out = tmp_path / kind
    hf.save_pretrained(out)
    return hf, out


def _tokens(seq: int = 24) -> torch.Tensor:
    return torch.randint(0, 97, (2, seq), generator=torch.Generator().manual_seed(1))


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape
    return (a - b).abs().max().item()


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "gemma3_capped"])
def test_gemma_logits_equal_transformers(kind, tmp_path):
    hf, path = _saved(kind, tmp_path)
    ours = from_pretrained(path).eval()
    tokens = _tokens()
    with torch.no_grad():
        want, got = hf(tokens).logits, ours(tokens)
    assert _max_diff(got, want) < TOL
    assert want.abs().max() > 1.0  # logits of size: the comparison is not between near-zero tensors
    assert count_parameters(ours) == sum(p.numel() for p in hf.parameters())  # tied weights counted once both sides
    assert ours.num_params() == count_parameters(ours)  # the config's analytic count = the modules'


def test_gemma2_caps_and_windows_change_the_logits(tmp_path):
    """Each Gemma 2 piece matters at this size: switched off, the logits move far beyond the tolerance (so the parity
    above is not vacuous)."""
    hf, path = _saved("gemma2", tmp_path)
    cfg = from_pretrained(path).cfg
    tokens = _tokens()
    with torch.no_grad():
        want = hf(tokens).logits
        for change in ({"attn_softcap": None}, {"final_softcap": None}, {"global_every": 0},
                       {"query_pre_attn_scalar": None}, {"post_norms": False}):
            other = from_pretrained(path, cfg=ModelConfig(**{**cfg.__dict__, **change})) if "post_norms" not in change \
                else None
            if other is None:
                continue  # post norms change the weights' layout: covered by test_gemma_import_maps_every_norm
            assert _max_diff(other.eval()(tokens), want) > 1e-2, change


def test_gemma_import_maps_every_norm(tmp_path):
    _, path = _saved("gemma3", tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    ours = model_config_from_hf(cfg)
    assert (ours.post_norms, ours.qk_norm, ours.norm_unit_offset, ours.scale_embeddings) == (True, True, True, True)
    assert (ours.sliding_window, ours.global_every, ours.rope_local_theta) == (5, 6, 10_000.0)
    assert ours.rope_theta == 1_000_000.0 and ours.rope_scaling == {"rope_type": "linear", "factor": 8.0}
    assert ours.mlp_act == "gelu_tanh" and ours.query_pre_attn_scalar == 16 and ours.head_dim == 12
    model = Decoder(ours)
    names = {n for n, _ in model.named_parameters()}
    assert {"layers.0.attention_post_norm.weight", "layers.0.ffn_post_norm.weight",
            "layers.0.attention.q_norm.weight"} <= names


@pytest.mark.parametrize("kind", ["gemma", "gemma2", "gemma3", "gemma3_capped"])
def test_gemma_export_round_trips_through_transformers(kind, tmp_path):
    hf, path = _saved(kind, tmp_path)
    ours = from_pretrained(path)
    out = save_hf(ours, ours.cfg, tmp_path / "export")
    back = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(back) is type(hf)
    tokens = _tokens()
    with torch.no_grad():
        assert _max_diff(back(tokens).logits, hf(tokens).logits) < TOL
    again = model_config_from_hf(json.loads((out / "config.json").read_text()))
    for name in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "ffn_dim", "norm_eps",
                 "rope_theta", "rope_scaling", "sliding_window", "tie_embeddings", "qk_norm", "post_norms",
                 "norm_unit_offset", "scale_embeddings", "mlp_act", "attn_softcap", "final_softcap", "global_every",
                 "rope_local_theta", "max_seq_len"):
        assert getattr(again, name) == getattr(ours.cfg, name), name
    assert again.attn_scale == ours.cfg.attn_scale


def test_transformers4_gemma3_config_keys_are_read():
    """Gemma 3 configs written by transformers 4.x: rope_theta, rope_local_base_freq, rope_scaling (full layers),
    sliding_window_pattern, no layer_types; the published gemma-3-4b text values."""
    data = {"model_type": "gemma3_text", "vocab_size": 262208, "hidden_size": 2560, "intermediate_size": 10240,
            "num_hidden_layers": 34, "num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256,
            "rope_theta": 1_000_000.0, "rope_local_base_freq": 10_000.0, "sliding_window": 1024,
            "sliding_window_pattern": 6, "rope_scaling": {"rope_type": "linear", "factor": 8.0},
            "query_pre_attn_scalar": 256, "final_logit_softcapping": None, "attn_logit_softcapping": None,
            "hidden_activation": "gelu_pytorch_tanh", "max_position_embeddings": 131072}
    cfg = model_config_from_hf(data)
    assert (cfg.rope_theta, cfg.rope_local_theta, cfg.rope_scaling) == (1e6, 1e4, {"rope_type": "linear", "factor": 8.0})
    assert (cfg.global_every, cfg.sliding_window, cfg.tie_embeddings, cfg.norm_eps) == (6, 1024, True, 1e-6)
    want = transformers.Gemma3TextConfig(**{k: v for k, v in data.items() if k != "model_type"})
    assert [cfg.layer_window(i) is not None for i in range(34)] == [t == "sliding_attention" for t in want.layer_types]


def test_multimodal_gemma3_imports_its_text_model_and_says_so(tmp_path, capsys, monkeypatch):
    """A Gemma3ForConditionalGeneration checkpoint: the text model's weights load (its logits equal the language
    model's), the vision tower's are left unread, and one note line says the vision tower is not imported."""
    T = transformers
    torch.manual_seed(0)
    text = T.Gemma3TextConfig(**SMALL, sliding_window=5)
    vision = T.SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                  image_size=28, patch_size=14)
    full = T.Gemma3ForConditionalGeneration(T.Gemma3Config(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                                           mm_tokens_per_image=4)).eval()
    _perturb(full)
    full.save_pretrained(tmp_path / "mm")
    from meshwright.config import hf as hf_config

    monkeypatch.setattr(hf_config, "_said", set())
    capsys.readouterr()
    ours = from_pretrained(tmp_path / "mm").eval()
    said = [line for line in capsys.readouterr().err.splitlines() if "vision tower" in line]
    assert len(said) == 1 and "vision tower and multimodal projector are not imported" in said[0]
    tokens = _tokens()
    with torch.no_grad():
        want = full(input_ids=tokens).logits
        assert _max_diff(ours(tokens), want) < TOL


@pytest.mark.parametrize("change,field", [
    ({"attn_logit_softcapping": 50.0}, "attn_logit_softcapping"),  # transformers' Gemma 3 ignores it: refused
    ({"layer_types": ["sliding_attention", "full_attention"] + ["sliding_attention"] * 4}, "layer_types"),
    ({"hidden_activation": "gelu"}, "hidden_activation"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention"),
])
def test_gemma3_settings_meshwright_cannot_run_are_one_line(change, field):
    data = {"model_type": "gemma3_text", **{k: v for k, v in SMALL.items() if v is not None}, "sliding_window": 5,
            **change}
    with pytest.raises(ConfigError) as err:
        model_config_from_hf(data)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change,field", [
    ({"post_norms": True}, "norm_unit_offset"),  # post norms without the rest of Gemma: no HF class computes it
    ({"norm_unit_offset": True, "scale_embeddings": True, "mlp_act": "gelu_tanh", "attn_softcap": 5.0,
      "qk_norm": True, "post_norms": True}, "attn_softcap"),
    ({"norm_unit_offset": True, "scale_embeddings": True, "mlp_act": "gelu_tanh", "sliding_window": 4}, "sliding_window"),
])
def test_export_of_a_model_no_gemma_class_computes_is_one_line(change, field):
    cfg = ModelConfig(**change)
    with pytest.raises(ConfigError) as err:
        hf_config_from_model(cfg)
    assert field in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("change,field", [
    ({"attn_softcap": 0.0}, "attn_softcap"), ({"final_softcap": float("inf")}, "final_softcap"),
    ({"global_every": 2}, "global_every"),  # without a window
    ({"sliding_window": 4, "global_every": 9}, "global_every"),
    ({"rope_local_theta": 1e4}, "rope_local_theta"),
    ({"mlp_act": "relu"}, "mlp_act"), ({"mlp_act": "gelu_tanh", "n_experts": 4}, "mlp_act"),
    ({"arch": "gpt2", "post_norms": True}, "post_norms"),
])
def test_gemma_fields_are_validated_in_one_line(change, field):
    with pytest.raises(ConfigError) as err:
        ModelConfig(**change).validate("model")
    assert f"model.{field}" in str(err.value) and "\n" not in str(err.value)


def test_llama_defaults_are_bit_identical():
    """The Gemma fields at their defaults build exactly the modules and outputs of before: no extra parameter, SDPA's
    own scale, the silu gate and the plain head."""
    torch.manual_seed(0)
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4, vocab_size=50, max_seq_len=32, sliding_window=5)
    model = Decoder(cfg).eval()
    names = [n for n, _ in model.named_parameters()]
    assert not any("post_norm" in n for n in names) and type(model.output) is torch.nn.Linear
    assert model.layers["0"].attention.core.scale is None and model.layers["0"].attention.core.softcap is None
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        a = model(tokens)
        h = model.tok_embeddings(tokens)
        for layer in model.layers.values():
            x = h + layer.attention(layer.attention_norm(h), model.rope(16))
            h = x + layer.feed_forward(layer.ffn_norm(x))
        assert torch.equal(a, model.output(model.norm(h)))


PRESETS = {  # preset -> (transformers class, config class, parameters in billions as the model cards round them)
    "gemma-2-2b": ("Gemma2ForCausalLM", "Gemma2Config", 2.6),
    "gemma-2-9b": ("Gemma2ForCausalLM", "Gemma2Config", 9.2),
    "gemma-3-1b": ("Gemma3ForCausalLM", "Gemma3TextConfig", 1.0),
    "gemma-3-4b": ("Gemma3ForCausalLM", "Gemma3TextConfig", 3.9),  # the text model of the 4.3B multimodal one
    "gemma-3-12b": ("Gemma3ForCausalLM", "Gemma3TextConfig", 11.8),  # of the 12.2B multimodal one
}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_gemma_presets_count_what_transformers_builds(preset):
    """Each preset exported to config.json and built by transformers on the meta device: the same parameter count as
    ModelConfig.num_params (post norms, q/k norms, head_dim 256 and tied embeddings all counted), and the preset's own
    layer pattern, rope bases and caps read back from that config."""
    from meshwright.config import load_model_config

    cfg = load_model_config(preset)
    model_cls, _, billions = PRESETS[preset]
    data = hf_config_from_model(cfg)
    hf_cfg = transformers.AutoConfig.for_model(**data)
    with torch.device("meta"):
        hf = getattr(transformers, model_cls)(hf_cfg)
    assert sum(p.numel() for p in hf.parameters()) == cfg.num_params()
    assert round(cfg.num_params() / 1e9, 1) == billions
    with torch.device("meta"):
        ours = Decoder(cfg)
    assert count_parameters(ours) == cfg.num_params()
    again = model_config_from_hf(data)
    assert [again.layer_window(i) for i in range(cfg.n_layers)] == [cfg.layer_window(i) for i in range(cfg.n_layers)]
    assert (again.rope_local_theta, again.attn_softcap, again.final_softcap) == (
        cfg.rope_local_theta, cfg.attn_softcap, cfg.final_softcap)


def _hw(**kw):
    from meshwright.launcher.planner import cost_model as cm

    return cm.Hardware(**{**dict(peak_flops=100e12, matmul_efficiency=1.0, devices_per_node=8, intra_bw=1e11,
                                 intra_lat=1e-5, inter_bw=1e10, inter_lat=1e-4, memory_bytes=80 * cm.GIB,
                                 stack="meshwright"), **kw})


def _saved_per_sequence(cfg: ModelConfig, seq: int, autocast: bool) -> float:
    """Bytes a block saves for backward per sequence of ``seq`` tokens (slope over batch 1 -> 2: fixed tensors such as
    the causal mask drop out)."""
    from meshwright.memory.accounting import count_saved_bytes
    from meshwright.models.decoder import Block
    from meshwright.models.layers import rope_tables

    sizes = []
    for batch in (1, 2):
        torch.manual_seed(0)
        block = Block(cfg, 0)
        x = torch.randn(batch, seq, cfg.d_model, requires_grad=True)
        rope = rope_tables(cfg.rope_dim, seq, cfg.rope_theta)
        with count_saved_bytes(block, exclude=list(rope)) as saved:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                block(x, rope)
        sizes.append(saved.total)
    return float(sizes[1] - sizes[0])


@pytest.mark.parametrize("autocast", [False, True])
def test_planner_counts_post_norms_and_capped_scores_as_measured(autocast):
    """The planner's eager activation model adds what a Gemma block saves beyond a Llama block, measured with
    count_saved_bytes: the post norms (per token) and the capped attention's scores (per score element, less the
    SDPA log-sum-exp the explicit path does not keep); GeGLU and the query scalar save nothing more."""
    from meshwright.launcher.planner import cost_model as cm

    elem = 2 if autocast else 4
    base = ModelConfig(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, n_layers=2, max_seq_len=64, vocab_size=50)
    llama = {seq: _saved_per_sequence(base, seq, autocast) for seq in (16, 32)}
    for change in ({"post_norms": True}, {"post_norms": True, "norm_unit_offset": True}, {"mlp_act": "gelu_tanh"},
                   {"query_pre_attn_scalar": 10}):
        cfg = ModelConfig(**{**base.__dict__, **change})
        extra = _saved_per_sequence(cfg, 16, autocast) - llama[16]
        assert extra == 16 * cm.post_norm_act_bytes(cfg, "none", elem), change
        assert cm.activation_bytes(cfg, 0, 16, 1, False, "none", elem) - cm.activation_bytes(base, 0, 16, 1, False,
                                                                                              "none", elem) == extra
    capped = ModelConfig(**{**base.__dict__, "attn_softcap": 5.0})
    lse = 4.0 * base.n_heads  # per token: SDPA's, not saved by the capped path
    for seq in (16, 32):
        extra = _saved_per_sequence(capped, seq, autocast) - llama[seq]
        assert extra == seq * (base.n_heads * seq * cm.capped_score_bytes(elem) - lse)
    hw = _hw(compute_dtype="fp32" if elem == 4 else "bf16")
    assert cm.attention_score_bytes(capped, 32, 32, 1, "none", hw) == 32 * base.n_heads * 32 * cm.capped_score_bytes(elem)
    assert cm.attention_score_bytes(base, 32, 32, 1, "none", hw) == 0.0  # flash SDPA: no scores in memory
    # selective recompute: SAC keeps the QK^T bmm output (its cache is invisible to the hooks: from the policy)
    assert cm.attention_score_bytes(capped, 32, 32, 1, "selective", hw) == 32 * base.n_heads * 32 * elem
    assert cm.attention_score_bytes(capped, 32, 32, 1, "full", hw) == 0.0


def test_flops_and_final_cap_memory_count_gemma():
    """PaLM FLOPs take the model's own parameter count (4 norms per block, q/k norms, head_dim 256 apart from
    d_model/n_heads, checked against transformers above) and the attention term at head_dim; the eager loss peak keeps
    the capped logits of Gemma 2's final soft-capping besides."""
    from meshwright.config import load_model_config
    from meshwright.launcher.planner import cost_model as cm

    cfg = load_model_config("gemma-2-2b")
    with torch.device("meta"):
        model = Decoder(cfg)
    body = count_parameters(model) - cfg.vocab_size * cfg.d_model  # tied: the embedding is the head
    assert cfg.num_params(non_embedding=True) == body
    seq = 4096
    assert cfg.flops_per_token(seq) == 6.0 * (body + cfg.vocab_size * cfg.d_model) + 12.0 * 26 * 8 * 256 * seq
    assert cfg.layer_params(0) - ModelConfig(**{**cfg.__dict__, "post_norms": False}).layer_params(0) == 2 * 2304
    hw = _hw(compute_dtype="bf16", runtime_buffers=True)
    uncapped = ModelConfig(**{**cfg.__dict__, "final_softcap": None})
    assert cm.loss_peak_bytes(cfg, 10, 1, hw) - cm.loss_peak_bytes(uncapped, 10, 1, hw) == 10 * cfg.vocab_size * 2


GEMMA_TINY = dict(d_model=64, n_heads=4, n_kv_heads=2, ffn_hidden=96, n_layers=2, max_seq_len=32, vocab_size=50,
                  norm_unit_offset=True, mlp_act="gelu_tanh", scale_embeddings=True, post_norms=True,
                  attn_softcap=5.0, final_softcap=3.0, sliding_window=4, global_every=2)


def test_consumers_that_compute_llama_blocks_themselves_refuse_gemma_in_one_line():
    """MEFT's reversible blocks, LeMo's scores, COAT's FP8 norms and gated MLP and the segmented loss re-implement part
    of the forward without Gemma's pieces: each refuses, naming the field, instead of training another model."""
    from meshwright.memory.fp8_activations import apply_fp8_activations
    from meshwright.memory.lemo import apply_lemo
    from meshwright.memory.meft import make_reversible
    from meshwright.memory.segmented_loss import segmented_lm_loss

    model = Decoder(ModelConfig(**GEMMA_TINY))
    tokens = torch.randint(0, 50, (1, 8))
    for call, field in ((lambda: make_reversible(model), "model.norm_unit_offset"),
                        (lambda: apply_lemo(model), "model.norm_unit_offset"),
                        (lambda: apply_fp8_activations(model), "model.norm_unit_offset"),
                        (lambda: segmented_lm_loss(model, tokens, tokens, 4), "model.final_softcap")):
        with pytest.raises(ConfigError) as err:
            call()
        assert field in str(err.value) and "\n" not in str(err.value)


def test_stack_exports_refuse_or_name_what_the_model_code_must_compute():
    """Megatron-LM's arguments and torchtitan's recipes define the model and cannot express Gemma: refused in one line
    (before any search too: check_emit_model). DeepSpeed takes the model from the user's code: its export names the
    transformers class to build and Gemma's pieces that other model code would drop."""
    from meshwright.launcher.planner import export as exports
    from meshwright.plan import default_plan

    cfg = ModelConfig(**GEMMA_TINY)
    plan = default_plan(cfg, 1, 16, 4, 4)
    for target, who in (("megatron", "Megatron-LM"), ("torchtitan", "torchtitan")):
        for call in (lambda: exports.emit(plan, cfg, target), lambda: exports.check_emit_model(target, cfg)):
            with pytest.raises(ConfigError) as err:
                call()
            text = str(err.value)
            assert "model.norm_unit_offset" in text and who in text and "\n" not in text, target
    _, notes = exports.emit(plan, cfg, "deepspeed")
    assert any("Gemma2ForCausalLM" in n and "Gemma's attn_softcap" in n for n in notes), notes
    _, notes = exports.emit(default_plan(ModelConfig(), 1, 16, 4, 4), ModelConfig(), "deepspeed")
    assert not any("Gemma" in n for n in notes)


def test_gemma_trains_and_its_loss_paths_agree():
    """One backward through every Gemma piece: the plain loss, the chunked loss (head called per chunk: capped there
    too) and the compiled-style head loss give the same value, and every parameter gets a finite gradient."""
    from meshwright.models.chunked_loss import chunked_lm_loss
    from meshwright.models.decoder import lm_loss

    torch.manual_seed(0)
    model = Decoder(ModelConfig(**GEMMA_TINY, qk_norm=True, rope_local_theta=100.0, query_pre_attn_scalar=10))
    tokens = torch.randint(0, 50, (2, 16))
    loss = lm_loss(model(tokens), tokens)
    chunked = chunked_lm_loss(model(tokens, return_hidden=True), model.output, tokens, 5)
    assert torch.allclose(loss, chunked, atol=1e-6)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert model.output(torch.full((1, 64), 100.0)).abs().max() <= 3.0  # capped logits


def test_planner_never_plans_the_savers_gemma_refuses():
    """--allow fp8 and lemo on a Gemma model: the runtime refuses COAT's FP8 activations and LeMo for Gemma, so the
    search never plans them (FP8 optimizer states stay allowed); the same shape without Gemma's fields takes FP8
    activations on its layers (gemma-2-9b, 8 H100, 8k tokens)."""
    import dataclasses

    from meshwright.config import load_cluster, load_model_config
    from meshwright.config.schema import GEMMA_FIELDS
    from meshwright.launcher.planner.search import Allow, search

    gemma, spec = load_model_config("gemma-2-9b"), load_cluster("dgx-h100-80g")
    best = search(gemma, spec, 8192, 64, allow=Allow(fp8=True, lemo=0.5)).best.plan
    assert not any(s.savers.fp8_act or s.savers.lemo is not None for s in best.layer_strategies())
    plain = search(dataclasses.replace(gemma, **GEMMA_FIELDS), spec, 8192, 64, allow=Allow(fp8=True)).best.plan
    assert any(s.savers.fp8_act for s in plain.layer_strategies())
