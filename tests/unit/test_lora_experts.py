"""LoRA on MoE experts (``experts.gate_up_proj`` / ``experts.down_proj``, PEFT's ``target_parameters`` spelling):
PEFT ParamWrapper's math on our stacked experts, frozen base and router, the trainer's run, ``--hf`` (merged) and
``--peft`` exports read by transformers / peft 0.21, a PEFT-made adapter read into ours, the one-line refusals, and
the per-rank adapter count the planner takes (``lora_adapter_params``)."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.cli import main  # noqa: E402
from meshwright.config import LoraConfig, load_model_config, load_train_config  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.memory.lora import (  # noqa: E402
    ExpertAdapter, apply_lora_config, lora_adapter_params, lora_parameters, lora_state_bytes, merge_lora,
)
from meshwright.models import build_model, from_pretrained  # noqa: E402
from meshwright.models.moe import moe_layers  # noqa: E402
from meshwright.train.build import run_training  # noqa: E402
from meshwright.train.checkpoint import latest_checkpoint  # noqa: E402
from meshwright.train.hf_export import load_run_model  # noqa: E402
from meshwright.train.peft_import import load_peft_adapter, lora_config_from_peft  # noqa: E402

from _train_helpers import prepared_corpus  # noqa: E402

EXPERTS = ["experts.gate_up_proj", "experts.down_proj"]
LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wv", *EXPERTS]}
MOE = {"name": "tiny-moe", "arch": "llama", "vocab_size": 64, "d_model": 32, "n_layers": 2, "n_heads": 4,
       "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2, "capacity_factor": None,
       "max_seq_len": 32}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def mixtral_dir(tmp_path_factory):
    """A tiny Mixtral (transformers 5.24: fused ``mlp.experts.gate_up_proj``/``down_proj`` in memory), fp32."""
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=256, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, max_position_embeddings=64, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("hf") / "mixtral"
    transformers.MixtralForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen3_moe_dir(tmp_path_factory):
    """A tiny Qwen3-MoE (q/k norms, ``mlp.experts``), fp32."""
    torch.manual_seed(0)
    cfg = transformers.Qwen3MoeConfig(vocab_size=256, hidden_size=32, intermediate_size=64, moe_intermediate_size=24,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                      num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("hf") / "qwen3moe"
    transformers.Qwen3MoeForCausalLM(cfg).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def lora_run(data, mixtral_dir, tmp_path_factory):
    """A 3-step expert-LoRA run from the Mixtral base; lr high enough that every B is far from zero."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_train_config({"init_from": str(mixtral_dir), "data": {"path": str(data)}, "seq_len": 32,
                             "global_batch": 4, "micro_batch": 4, "steps": 3, "warmup_steps": 0, "lr": 3e-2,
                             "min_lr": 3e-2, "eval_every": 0, "out_dir": str(run), "progress": False,
                             "energy": False, "lora": LORA})
    run_training(cfg)
    return run


def _moe(**over):
    return load_model_config({**MOE, **over})


def _randomize(model, seed=5, std=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * std)


def test_expert_adapters_have_peft_shapes_freeze_the_base_and_start_at_the_base_model():
    cfg = _moe()
    base = build_model(cfg, seed=1)
    model = build_model(cfg, seed=1)
    adapted = apply_lora_config(model, LoraConfig(**LORA), seed=3)
    assert {"layers.0.feed_forward.experts.gate_up_proj", "layers.1.feed_forward.experts.down_proj"} <= set(adapted)
    experts = model.layers["0"].feed_forward.experts
    gu, dn = experts.gate_up_proj, experts.down_proj
    assert isinstance(gu, ExpertAdapter) and isinstance(dn, ExpertAdapter)
    # per expert: gate_up A (r, d_model) shared by gate and up, B (2 * hidden, r); down A (r, hidden), B (d_model, r)
    assert tuple(gu.lora_A.shape) == (4, 4, 32) and tuple(gu.lora_B.shape) == (4, 96, 4)
    assert tuple(dn.lora_A.shape) == (4, 4, 48) and tuple(dn.lora_B.shape) == (4, 32, 4)
    assert gu.lora_scale == dn.lora_scale == 2.0 and float(gu.lora_A.abs().max()) > 0 and not gu.lora_B.any()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    frozen = [p for n, p in model.named_parameters() if ".router." in n or n.endswith(("w1", "w2", "w3"))]
    assert frozen and not any(p.requires_grad for p in frozen)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)  # B = 0: the base model
    # the same A for every layout: keyed by (seed, module name), not drawn from the global stream
    again = build_model(cfg, seed=1)
    torch.manual_seed(123)
    apply_lora_config(again, LoraConfig(**LORA), seed=3)
    assert torch.equal(again.layers["0"].feed_forward.experts.gate_up_proj.lora_A, gu.lora_A)


def test_expert_adapters_train_and_act_as_the_merged_weights():
    """y = W + scale * B A per expert (PEFT's ParamWrapper delta): the adapted model equals its merged copy, and the
    backward reaches every expert adapter (gate_up's B through both gate and up rows), not the frozen experts."""
    cfg = _moe()
    model = build_model(cfg, seed=1)
    apply_lora_config(model, LoraConfig(**LORA), seed=3)
    _randomize(model)
    x = torch.randint(0, 64, (2, 16), generator=torch.Generator().manual_seed(0))
    model(x).pow(2).mean().backward()
    gu = model.layers["0"].feed_forward.experts.gate_up_proj
    assert gu.lora_B.grad[:, :48].abs().sum() > 0 and gu.lora_B.grad[:, 48:].abs().sum() > 0
    for p in lora_parameters(model):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    merged = build_model(cfg, seed=1)
    apply_lora_config(merged, LoraConfig(**LORA), seed=3)
    merged.load_state_dict(model.state_dict())
    names = merge_lora(merged)
    assert "layers.1.feed_forward.experts.gate_up_proj" in names
    assert set(merged.state_dict()) == set(build_model(cfg, device="meta").state_dict())  # the plain architecture
    with torch.no_grad():
        torch.testing.assert_close(merged(x), model(x), atol=1e-5, rtol=1e-5)
        assert (merged(x) - build_model(cfg, seed=1)(x)).abs().max() > 1e-2  # the adapters did change the model


def test_state_bytes_and_the_planner_count_include_expert_adapters():
    cfg = _moe()
    lora = LoraConfig(**LORA)
    meta = build_model(cfg, device="meta")
    apply_lora_config(meta, lora, seed=0)
    every = sum(p.numel() for p in lora_parameters(meta))
    r, d, h, e = 4, 32, 48, 4
    expert = 2 * e * r * ((d + 2 * h) + (h + d))  # two MoE layers, gate_up and down, A and B
    dense = 2 * r * ((32 + 32) + (32 + 16))  # two layers of wq (32 -> 32) and wv (32 -> 16)
    assert every == expert + dense == lora_adapter_params(cfg, lora)
    assert lora_state_bytes(cfg, lora)["trainable"] == every
    assert lora_adapter_params(cfg, lora, ep=2) == dense + expert // 2
    assert lora_adapter_params(cfg, lora, ep=4) == dense + expert // 4
    assert lora_adapter_params(cfg, lora, ep=2, layers=[1]) == (dense + expert // 2) // 2  # one stage of pp2
    assert lora_adapter_params(cfg, lora, ep=2, experts_only=True) == expert // 2
    assert lora_adapter_params(cfg, lora, ep=4, layers=[0], experts_only=True) == expert // 8
    attention_only = LoraConfig(rank=4, alpha=8.0, targets=["wq", "wv"])
    assert lora_adapter_params(cfg, attention_only, ep=4) == lora_adapter_params(cfg, attention_only) == dense
    for bad in (3, 0, True):
        with pytest.raises(ConfigError) as exc:
            lora_adapter_params(cfg, lora, ep=bad)
        assert str(exc.value).startswith("ep=") and "\n" not in str(exc.value)


@pytest.mark.parametrize("lora, field, says", [
    ({**LORA, "dropout": 0.1}, "lora.dropout", "target_parameters"),
    ({"targets": ["gate_up_proj"]}, "lora.targets[0]", "experts.gate_up_proj"),
    ({"targets": ["mlp.experts.down_proj"]}, "lora.targets[0]", "experts.down_proj"),
])
def test_bad_expert_sections_are_one_line(lora, field, says):
    with pytest.raises(ConfigError) as exc:
        LoraConfig(**lora).validate("lora")
    msg = str(exc.value)
    assert msg.startswith(f"{field}=") and says in msg and "\n" not in msg


@pytest.mark.parametrize("cfg, lora, start, says", [
    (MOE, dict(rank=4, targets=EXPERTS, dropout=0.1), "lora.dropout=0.1", "target_parameters"),
    (MOE, dict(rank=33, targets=["experts.gate_up_proj"]), "lora.rank=33", "at most min(in, out)=32"),
    ({**MOE, "n_experts": 0, "moe_ffn_hidden": None}, dict(rank=4, targets=["wq", "experts.down_proj"]),
     "lora.targets[1]='experts.down_proj'", "no MoE block"),
    (MOE, dict(rank=4, targets=["wq", "w1"]), "lora.targets[1]='w1'", "experts.gate_up_proj"),
])
def test_expert_refusals_on_the_model_are_one_line(cfg, lora, start, says):
    model = build_model(load_model_config(cfg), device="meta")
    with pytest.raises(ConfigError) as exc:
        apply_lora_config(model, LoraConfig(**lora), seed=0)
    msg = str(exc.value)
    assert msg.startswith(start) and says in msg and "\n" not in msg, msg


def test_the_run_trains_expert_adapters_only(lora_run, mixtral_dir):
    model, model_cfg, cfg = load_run_model(latest_checkpoint(lora_run / "ckpt"), lora_run)
    base = from_pretrained(mixtral_dir)
    experts = model.layers["1"].feed_forward.experts
    assert float(experts.gate_up_proj.lora_B.abs().min(dim=-1).values.max()) > 0
    assert float(experts.down_proj.lora_B.abs().max()) > 1e-3
    ref = base.layers["1"].feed_forward
    for w in ("w1", "w2", "w3"):  # the frozen experts and router: the base's
        assert torch.equal(getattr(experts, w), getattr(ref.experts, w))
    assert torch.equal(model.layers["1"].feed_forward.router.weight, ref.router.weight)


def _ours(run):
    model, model_cfg, _ = load_run_model(latest_checkpoint(run / "ckpt"), run)
    for block in moe_layers(model).values():
        assert block.capacity_factor is None  # routed as transformers routes
    return model.eval(), model_cfg


def test_hf_and_peft_exports_give_our_logits_in_transformers_and_peft(lora_run, mixtral_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from safetensors.torch import load_file

    model, _ = _ours(lora_run)
    hf, pf = tmp_path / "hf", tmp_path / "peft"
    assert main(["export", str(lora_run), "--hf", str(hf), "--peft", str(pf)]) == 0
    config = json.loads((pf / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["lora_dropout"] == 0.0
    assert sorted(config["target_parameters"]) == sorted(EXPERTS)
    tensors = load_file(str(pf / "adapter_model.safetensors"))
    gate_up_a = tensors["base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight"]
    down_b = tensors["base_model.model.model.layers.0.mlp.experts.lora_B.weight"]
    assert tuple(gate_up_a.shape) == (4 * 4, 32) and tuple(down_b.shape) == (32, 4 * 4)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(x)
        merged = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()(x).logits
        base = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32)
        pm = peft.PeftModel.from_pretrained(base, str(pf)).eval()
        adapted = pm(x).logits
    assert type(pm.base_model.model.model.layers[0].mlp.experts).__name__ == "ParamWrapper"
    torch.testing.assert_close(merged, ours, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(adapted, ours, atol=1e-4, rtol=1e-4)
    with torch.no_grad():  # the adapters changed the model (PEFT wrapped ``base`` in place: the plain one anew)
        plain = transformers.AutoModelForCausalLM.from_pretrained(mixtral_dir, dtype=torch.float32).eval()(x).logits
        assert (adapted - plain).abs().max() > 1e-3


@pytest.mark.parametrize("arch, targets", [("mixtral", ["experts.gate_up_proj", "experts.down_proj"]),
                                           ("mixtral", ["experts.gate_up_proj"]),
                                           ("qwen3_moe", ["mlp.experts.down_proj", "mlp.experts.gate_up_proj"])])
def test_a_peft_made_expert_adapter_loads_into_ours(request, tmp_path, arch, targets):
    """An adapter made by peft 0.21 itself (get_peft_model with target_parameters, random A and B, save_pretrained)
    read by ``lora_config_from_peft`` + ``load_peft_adapter``: our logits equal PEFT's (Mixtral; one expert target
    alone, whose keys PEFT does not nest; Qwen3-MoE with the ``mlp.experts.`` spelling)."""
    peft = pytest.importorskip("peft")
    hf_dir = request.getfixturevalue("mixtral_dir" if arch == "mixtral" else "qwen3_moe_dir")
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    pc = peft.LoraConfig(r=2, lora_alpha=6, target_modules=["q_proj", "o_proj"], target_parameters=targets)
    pm = peft.get_peft_model(base, pc)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    out = tmp_path / "adapter"
    pm.save_pretrained(out)
    lora = lora_config_from_peft(out)
    ours = [t.removeprefix("mlp.") for t in targets]
    assert (lora.rank, lora.alpha, sorted(lora.targets)) == (2, 6, sorted(["wq", "wo", *ours]))
    model = from_pretrained(hf_dir)
    apply_lora_config(model, lora, seed=0)
    keys = load_peft_adapter(model, load_model_config_of(hf_dir), out)
    assert any(".mlp.experts." in k for k in keys)
    x = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), pm.eval()(x).logits, atol=1e-4, rtol=1e-4)


def load_model_config_of(hf_dir):
    from meshwright.config.hf import model_config_from_hf

    return model_config_from_hf(json.loads((hf_dir / "config.json").read_text()))


def test_our_peft_export_reads_back_and_bad_adapters_are_one_line(lora_run, mixtral_dir, tmp_path):
    model, model_cfg = _ours(lora_run)
    pf = tmp_path / "peft"
    assert main(["export", str(lora_run), "--peft", str(pf)]) == 0
    lora = lora_config_from_peft(pf)
    fresh = from_pretrained(mixtral_dir)
    apply_lora_config(fresh, lora, seed=99)
    load_peft_adapter(fresh, model_cfg, pf)
    mine = dict(model.named_parameters())
    for n, p in fresh.named_parameters():
        if p.requires_grad:
            assert torch.equal(p, mine[n]), n
    # a model adapted with another rank: the shapes differ
    other = from_pretrained(mixtral_dir)
    apply_lora_config(other, LoraConfig(rank=2, targets=lora.targets), seed=0)
    with pytest.raises(ConfigError) as exc:
        load_peft_adapter(other, model_cfg, pf)
    assert "has shape" in str(exc.value) and "\n" not in str(exc.value)
    config = json.loads((pf / "adapter_config.json").read_text())
    for key, value in (("use_dora", True), ("target_modules", "q_proj|v_proj"),
                       ("target_parameters", ["experts.router"])):
        (pf / "adapter_config.json").write_text(json.dumps({**config, key: value}))
        with pytest.raises(ConfigError) as exc:
            lora_config_from_peft(pf)
        assert key in str(exc.value) and "\n" not in str(exc.value)
