"""LoRA fine-tuning in the trainer (``lora:``): config, what trains, memory, checkpoints/resume, and the exports
users take elsewhere: ``--hf`` merged (transformers' logits equal ours) and ``--peft`` (PEFT's format, q/k B rows
permuted like the base rows; checked with PEFT itself where it is installed)."""

from __future__ import annotations

import json
import shutil
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from meshwright.cli import main  # noqa: E402
from meshwright.config import LoraConfig, load_cluster, load_model_config, load_train_config  # noqa: E402
from meshwright.config.io import dump_yaml, from_dict  # noqa: E402
from meshwright.config.schema import TrainConfig  # noqa: E402
from meshwright.errors import ConfigError  # noqa: E402
from meshwright.memory.lora import LoRALinear, apply_lora_config, lora_state_bytes, merge_lora  # noqa: E402
from meshwright.models import build_model, from_pretrained  # noqa: E402
from meshwright.models.hf_weights import rotate_half_to_pairs  # noqa: E402
from meshwright.train.build import build_runtime, check_lora_layout, check_memory, run_training  # noqa: E402
from meshwright.train.checkpoint import latest_checkpoint  # noqa: E402
from meshwright.train.hf_export import load_run_model  # noqa: E402
from meshwright.train.local_runtime import LocalRuntime  # noqa: E402
from meshwright.train.trainer import Trainer, build_optimizer  # noqa: E402

from _train_helpers import MICRO, prepared_corpus  # noqa: E402


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepared_corpus(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A tiny Llama (GQA: q and k permuted with different head counts), fp32, untied."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    out = tmp_path_factory.mktemp("hf") / "base"
    transformers.LlamaForCausalLM(cfg).save_pretrained(out)
    return out


LORA = {"rank": 4, "alpha": 8.0, "targets": ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]}


@pytest.fixture(scope="module")
def lora_run(data, hf_dir, tmp_path_factory):
    """A 3-step LoRA run from the HF base, lr high enough that every B is far from zero."""
    run = tmp_path_factory.mktemp("lora") / "run"
    cfg = load_train_config({"init_from": str(hf_dir), "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                             "micro_batch": 4, "steps": 3, "warmup_steps": 0, "lr": 3e-2, "min_lr": 3e-2,
                             "eval_every": 0, "out_dir": str(run), "progress": False, "energy": False, "lora": LORA})
    run_training(cfg)
    return run


def test_lora_section_round_trips_yaml_and_defaults():
    cfg = from_dict(TrainConfig, {"lora": {"rank": 16, "alpha": 32, "targets": ["wq", "wv"], "dropout": 0.05,
                                           "modules_to_save": ["output"]}})
    again = load_train_config(__import__("yaml").safe_load(dump_yaml(cfg)))
    assert again.lora == cfg.lora and again.lora.scale == 2.0
    assert from_dict(TrainConfig, {"lora": {}}).lora == LoraConfig()
    assert LoraConfig(rank=8).scale == 1.0  # alpha null = rank


@pytest.mark.parametrize("lora, field", [
    ({"rank": 0}, "lora.rank"), ({"rank": True}, "lora.rank"), ({"alpha": 0}, "lora.alpha"),
    ({"targets": []}, "lora.targets"), ({"targets": ["q_proj"]}, "lora.targets[0]"),
    ({"targets": ["wq", "wq"]}, "lora.targets[1]"), ({"dropout": 1.0}, "lora.dropout"),
    ({"modules_to_save": ["lm_head"]}, "lora.modules_to_save[0]"), ({"rnak": 4}, "lora.rnak")])
def test_bad_lora_sections_are_one_line_errors(lora, field):
    with pytest.raises(ConfigError) as exc:
        from_dict(TrainConfig, {"lora": lora})
    msg = str(exc.value)
    assert msg.startswith(field) and "\n" not in msg
    if lora.get("targets") == ["q_proj"]:
        assert "wq" in msg  # the HF name is mapped to ours in the message


def test_lora_and_meft_together_are_refused():
    with pytest.raises(ConfigError, match=r"^lora=.*meft"):
        from_dict(TrainConfig, {"lora": {}, "meft": {}})


def test_only_adapters_and_modules_to_save_train_and_the_model_starts_as_the_base(data, tmp_path):
    cfg = load_train_config({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                             "micro_batch": 4, "steps": 1, "warmup_steps": 0, "out_dir": str(tmp_path / "r"), "progress": False,
                             "lora": {"rank": 2, "targets": ["wq", "wv"], "modules_to_save": ["output"]}})
    rt = build_runtime(cfg)
    base = build_model(load_model_config(MICRO), seed=cfg.seed)
    trainable = {n for n, p in rt.model.named_parameters() if p.requires_grad}
    assert trainable == {f"layers.{i}.attention.{w}.lora_{ab}" for i in range(2) for w in ("wq", "wv")
                         for ab in "AB"} | {"output.weight"}
    x = torch.randint(0, 256, (2, 16))
    assert torch.equal(rt.model(x), base(x))  # B = 0: the adapted model is the base
    opt_params = {id(p) for g in build_optimizer(cfg, rt).param_groups for p in g["params"]}
    assert opt_params == {id(p) for p in rt.model.parameters() if p.requires_grad}


def test_optimizer_and_gradient_bytes_are_the_adapters_only():
    """The memory model's numbers are what AdamW really allocates: no grads, no moments for the frozen base."""
    model_cfg = load_model_config(MICRO)
    lora = LoraConfig(rank=4, targets=["wq", "wk", "wv", "wo"])
    want = lora_state_bytes(model_cfg, lora)
    d, kv = 64, 2 * 16  # MICRO: d_model 64, 2 kv heads of 16
    assert want["trainable"] == 2 * 4 * ((d + d) + (d + kv) + (d + kv) + (d + d))
    model = build_model(model_cfg, seed=0)
    apply_lora_config(model, lora, seed=0)
    rt = LocalRuntime(model)
    opt = torch.optim.AdamW(rt.param_groups(0.1), lr=1e-3)
    rt.forward_backward([(torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16)))])
    grads = sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
    opt.step()
    moments = sum(s[k].numel() * s[k].element_size() for s in opt.state.values() for k in ("exp_avg", "exp_avg_sq"))
    assert (grads, moments) == (want["grads"], want["optimizer"]) == (4 * want["trainable"], 8 * want["trainable"])
    assert want["weights"] == 4 * (model_cfg.num_params() + want["trainable"])


def test_memory_check_counts_the_frozen_base_as_weights_only():
    """A model whose full training (16 B/param) cannot fit is accepted with LoRA (4 B/param + adapters)."""
    cfg = load_model_config("llama3-8b")
    lora = LoraConfig(rank=16)
    state = lora_state_bytes(cfg, lora)
    room = state["weights"] + state["grads"] + state["optimizer"] + 2**30
    with pytest.raises(ConfigError, match=r"^model="):
        check_memory(cfg, 1, available=room)
    check_memory(cfg, 1, available=room, lora=lora)
    with pytest.raises(ConfigError, match=r"^model=.*4\.0[0-9] bytes per parameter"):
        check_memory(cfg, 1, available=state["weights"], lora=lora)


def test_checkpoint_resume_replays_a_lora_run_exactly(data, tmp_path):
    def trainer(out, steps=4):
        cfg = load_train_config({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                                 "micro_batch": 4, "steps": steps, "warmup_steps": 1, "ckpt_every": 2,
                                 "eval_every": 0, "out_dir": str(out), "progress": False, "energy": False,
                                 "lora": {"rank": 2, "dropout": 0.1}})
        from meshwright.data.loader import build_loaders

        model_cfg = load_model_config(MICRO)
        model = build_model(model_cfg, seed=cfg.seed)
        apply_lora_config(model, cfg.lora, cfg.seed)
        train, val, _ = build_loaders(cfg, model_cfg.vocab_size, progress=False)
        return Trainer(cfg, LocalRuntime(model), train, val, model_cfg, load_cluster(cfg.cluster),
                       print_fn=lambda s: None)

    straight = trainer(tmp_path / "straight")
    straight.fit()
    shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
    ckpt = tmp_path / "resumed" / "ckpt"
    shutil.rmtree(ckpt / "step_000004")
    (ckpt / "latest").write_text("step_000002\n")
    resumed = trainer(tmp_path / "resumed")
    assert resumed.fit(resume=True)["steps_this_run"] == 2
    for (n, p), q in zip(straight.runtime.model.named_parameters(), resumed.runtime.model.parameters()):
        assert torch.equal(p, q), n
    opt_a, opt_b = straight.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert len(opt_a) == len(opt_b) == 2 * 4 * 2  # adapters only: 2 layers x 4 targets x (A, B)
    for k in opt_a:
        assert torch.equal(opt_a[k]["exp_avg"], opt_b[k]["exp_avg"])


def _ours(run):
    """The run's adapted model (unmerged) as its latest checkpoint holds it."""
    model, model_cfg, cfg = load_run_model(latest_checkpoint(run / "ckpt"), run)
    return model.eval(), model_cfg, cfg


def test_lora_run_trains_adapters_only_and_exports_merged_for_transformers(lora_run, hf_dir, tmp_path):
    model, model_cfg, _ = _ours(lora_run)
    base = from_pretrained(hf_dir)
    adapted = [m for m in model.modules() if isinstance(m, LoRALinear)]
    assert len(adapted) == 7 * 2 and all(m.lora_B.abs().max() > 1e-3 for m in adapted)
    state = model.state_dict()
    for name, p in base.state_dict().items():  # the frozen base left the checkpoint as init_from gave it
        assert torch.equal(state[name], p), name
    out = tmp_path / "merged"
    assert main(["export", str(lora_run), "--hf", str(out)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
        torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=1e-4)
        assert not torch.allclose(base(x), ours, atol=1e-3)  # the adapters changed the function
    plain = merge_lora(model)
    assert len(plain) == 14 and not any(isinstance(m, LoRALinear) for m in model.modules())


def test_peft_export_format_and_qk_permutation(lora_run, hf_dir, tmp_path, monkeypatch, capsys):
    """Format checked without PEFT (its import made to fail, as on the GPU image, which has no peft): the keys and
    config PEFT reads, and base + scale * B @ A of every exported module equals the merged export's weight, which
    holds only if q/k's B rows were permuted like the base's."""
    from safetensors.torch import load_file

    model, model_cfg, _ = _ours(lora_run)
    out, merged = tmp_path / "peft", tmp_path / "merged"
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    assert main(["export", str(lora_run), "--peft", str(out), "--hf", str(merged)]) == 0
    said = [line for line in capsys.readouterr().out.splitlines() if "adapter_config.json" in line]
    assert len(said) == 1 and "peft is not needed to write them" in said[0]
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["r"], config["lora_alpha"]) == ("LORA", "CAUSAL_LM", 4, 8.0)
    assert sorted(config["target_modules"]) == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj"])
    assert config["base_model_name_or_path"] == str(hf_dir.resolve())
    tensors = load_file(str(out / "adapter_model.safetensors"))
    assert len(tensors) == 2 * 7 * 2
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in tensors
    base, want = load_file(str(hf_dir / "model.safetensors")), load_file(str(merged / "model.safetensors"))
    for key in [k for k in tensors if k.endswith("lora_A.weight")]:
        module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
        a, b = tensors[key], tensors[key.replace("lora_A", "lora_B")]
        torch.testing.assert_close(base[f"{module}.weight"] + 2.0 * b @ a, want[f"{module}.weight"], atol=1e-5, rtol=0)
    ours_q = model.layers["0"].attention.wq
    peft_b = tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"]
    assert not torch.equal(peft_b, ours_q.lora_B.detach())  # permuted ...
    torch.testing.assert_close(peft_b, rotate_half_to_pairs(ours_q.lora_B.detach(), model_cfg.n_heads, inverse=True))
    peft_kb = tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"]
    torch.testing.assert_close(peft_kb, rotate_half_to_pairs(model.layers["0"].attention.wk.lora_B.detach(),
                                                             model_cfg.kv_heads, inverse=True))


def test_peft_loads_our_adapter_with_our_logits(lora_run, hf_dir, tmp_path):
    peft = pytest.importorskip("peft")
    model, _, _ = _ours(lora_run)
    out = tmp_path / "peft"
    assert main(["export", str(lora_run), "--peft", str(out)]) == 0
    base = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, torch_dtype=torch.float32)
    pm = peft.PeftModel.from_pretrained(base, str(out)).eval()
    x = torch.randint(0, 256, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(pm(x).logits, model(x), atol=1e-4, rtol=1e-4)


def test_peft_export_refusals_are_one_line(data, tmp_path, capsys):
    from meshwright.train.build import run_training as rt

    plain = tmp_path / "plain"
    rt(load_train_config({"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                          "micro_batch": 4, "steps": 1, "warmup_steps": 0, "eval_every": 0, "out_dir": str(plain), "progress": False,
                          "energy": False}))
    assert main(["export", str(plain), "--peft", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--peft" in err[0] and "lora" in err[0]
    assert main(["export", str(plain)]) == 2
    assert "--hf/--peft" in capsys.readouterr().err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "adapter_config.json").write_text("{}")
    gpt2 = tmp_path / "gpt2"
    rt(load_train_config({"model": "tiny-gpt2", "data": {"path": str(data)}, "seq_len": 32, "global_batch": 4,
                          "micro_batch": 4, "steps": 1, "warmup_steps": 0, "eval_every": 0, "out_dir": str(gpt2), "progress": False,
                          "energy": False, "lora": {"rank": 2, "targets": ["wq", "wo"]}}))
    assert main(["export", str(gpt2), "--peft", str(foreign)]) == 2
    assert "another adapter" in capsys.readouterr().err and (foreign / "adapter_config.json").read_text() == "{}"
    assert main(["export", str(gpt2), "--peft", str(tmp_path / "g")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "c_attn" in err[0] and "--hf" in err[0]
    assert main(["export", str(gpt2), "--hf", str(tmp_path / "g2")]) == 0  # merged works for every architecture


@pytest.mark.timeout(600)
@pytest.mark.parametrize("scope", ["blocks"])  # "model" passes too (3.5 min for both on 2 shared cores): not in CI
def test_compile_with_lora_matches_eager(scope):
    """``compile: true`` with ``lora:``: the adapted blocks (and with compile_scope model, the whole forward) compile
    with the trainer's backend and train the adapters as eager does."""
    torch._dynamo.reset()
    model_cfg = load_model_config(MICRO)
    lora = LoraConfig(rank=4, dropout=0.0)
    x = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(3))
    losses = []
    for backend in (None, "inductor"):
        model = build_model(model_cfg, seed=1)
        apply_lora_config(model, lora, seed=1)
        rt = LocalRuntime(model, compile_backend=backend, compile_scope=scope if backend else "blocks")
        opt = torch.optim.AdamW(rt.param_groups(0.0), lr=1e-2)
        run = []
        for _ in range(3):
            run.append(rt.forward_backward([(x[:, :-1], x[:, 1:])]))
            rt.optimizer_step(opt)
        losses.append(run)
        if backend:
            assert all(m.lora_B.abs().max() > 0 for m in model.modules() if isinstance(m, LoRALinear))
    assert all(abs(a - b) <= 1e-5 * abs(a) for a, b in zip(*losses)), losses


def _lora_plan_cfg(plan: str, tmp_path, **over):
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    return load_train_config({"model": "tiny", "seq_len": 64, "global_batch": 8, "micro_batch": 4, "steps": 1,
                              "warmup_steps": 0, "out_dir": str(tmp_path / "r"), "plan": str(root / "configs/plans" / plan),
                              "lora": {}, **over})


@pytest.mark.parametrize("plan, over, field", [
    ("tiny-moe-ep2.yaml", {"model": "tiny-moe", "lora": {"targets": ["wq", "w1"]}}, "lora.targets"),
    ("tiny-dp2.yaml", {"dp_backend": "deepspeed"}, "dp_backend='deepspeed'"),
    ("tiny-dp2.yaml", {"compile": True}, "compile=True")])
def test_unsupported_distributed_layouts_are_refused_in_one_line(plan, over, field, tmp_path, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("meshwright.train.build._installed", lambda m: True)
    with pytest.raises(ConfigError) as exc:
        build_runtime(_lora_plan_cfg(plan, tmp_path, **over))
    assert str(exc.value).startswith(field) and "lora" in str(exc.value) and "\n" not in str(exc.value)


@pytest.mark.parametrize("plan, over", [("tiny-tp2.yaml", {}), ("tiny-pp2.yaml", {}), ("tiny-dp2-tp2.yaml", {}),
                                        ("tiny-pp2-dp2.yaml", {}), ("tiny-tp2.yaml", {"tp_backend": "megatron"})])
def test_lora_runs_tensor_and_pipeline_parallel_plans(plan, over, tmp_path, monkeypatch):
    """tp (+sp; DTensor or megatron-core), pp and their dp mixes pass check_lora_layout (parity:
    tests/distributed/parity_2rank.py and parity_4rank.py): without a process group the refusal is the one asking
    for torchrun, not one about lora. The megatron-core case runs tiny-tp2 without sp (the megatron stack's rule,
    checked here by the runtime's own check_runtime_support)."""
    from pathlib import Path

    from meshwright.parallel.support import check_runtime_support
    from meshwright.plan import load_plan

    path = _lora_plan_cfg(plan, tmp_path).plan
    if over.get("tp_backend") == "megatron":
        path = tmp_path / "megatron-tp2.yaml"
        path.write_text(Path(_lora_plan_cfg(plan, tmp_path).plan).read_text().replace("sp: true", "sp: false"))
        plan = str(path)
        check_runtime_support(load_plan(path), load_model_config("tiny"), "megatron", "torch")
    loaded = load_plan(path)
    monkeypatch.setenv("WORLD_SIZE", str(loaded.world_size()))
    monkeypatch.setattr("meshwright.train.build._installed", lambda m: True)
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"^plan=.*launch it with torchrun") as exc:
        build_runtime(_lora_plan_cfg(plan, tmp_path, micro_batch=loaded.micro_batch, **over))
    assert "lora" not in str(exc.value).replace(str(path), "")


def test_lora_with_attention_targets_runs_expert_parallel_plans(tmp_path, monkeypatch):
    """ep > 1 with q/k/v/o adapters passes check_lora_layout (parity: tests/distributed/ep_parity.py): without a process
    group the refusal is the one asking for torchrun; MLP targets under ep are one line naming lora.targets and ep."""
    cfg = _lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe")
    check_lora_layout(cfg, __import__("meshwright.plan", fromlist=["load_plan"]).load_plan(cfg.plan))
    monkeypatch.setenv("WORLD_SIZE", "2")
    for key in ("MASTER_ADDR", "MASTER_PORT", "RANK"):
        monkeypatch.delenv(key, raising=False)
    with pytest.raises(ConfigError, match=r"^plan=.*launch it with torchrun"):
        build_runtime(cfg)
    mlp = _lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe", lora={"targets": ["wq", "w2", "w3"]})
    with pytest.raises(ConfigError) as exc:
        check_lora_layout(mlp, __import__("meshwright.plan", fromlist=["load_plan"]).load_plan(cfg.plan))
    msg = str(exc.value)
    assert msg.startswith("lora.targets=['wq', 'w2', 'w3'] is invalid; valid: attention (wq, wk, wv, wo) or expert "
                          "targets (experts.gate_up_proj, experts.down_proj)") and "\n" not in msg
    assert "layers[0].ep=2" in msg and "w2, w3" in msg and "experts.*" in msg
    # the experts' own targets run under ep (ep_parity.py lora_experts rows)
    experts = _lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe",
                             lora={"targets": ["wq", "experts.gate_up_proj", "experts.down_proj"]})
    check_lora_layout(experts, __import__("meshwright.plan", fromlist=["load_plan"]).load_plan(cfg.plan))
    # tiny-moe's blocks are all MoE: there w2 names only experts, which carry no adapters in any layout (said before
    # anything is built, by the memory check's count of the adapters)
    with pytest.raises(ConfigError, match=r"^lora.targets\[1\]='w2' is invalid; valid: a module with adapters: .*"
                                          r"experts' stacked weights"):
        build_runtime(mlp)


def test_expert_only_targets_are_refused_in_one_process_and_dense_blocks_adapt():
    """w1/w2/w3 on a model whose blocks are all MoE used to train nothing without a word; on dense blocks between MoE
    blocks they are linears and adapt (the experts beside them get none)."""
    moe = load_model_config("tiny-moe")
    with pytest.raises(ConfigError, match=r"^lora.targets\[1\]='w1' is invalid") as exc:
        apply_lora_config(build_model(moe, device="meta"), LoraConfig(targets=["wq", "w1"]), 0)
    assert "\n" not in str(exc.value)
    mixed = load_model_config({**moe.__dict__, "moe_every": 2})
    adapted = apply_lora_config(build_model(mixed, device="meta"), LoraConfig(targets=["wq", "w1"]), 0)
    assert sorted(n for n in adapted if n.endswith("w1")) == [f"layers.{i}.feed_forward.w1" for i in range(4)
                                                              if not mixed.is_moe_layer(i)]


def test_planner_searches_ep_with_attention_lora_and_counts_adapters_per_rank():
    """With attention adapters the search may pick ep (check_lora_layout accepts it); with w1/w2/w3 it keeps ep = 1.
    Per rank, a MoE block's adapters are replicated over ep like the attention they sit on: Mixtral-8x7B r16 on q/k/v/o
    has the same gradient and AdamW bytes per rank at ep 8 as at ep 1 (4 and 8 B per adapter parameter, ZeRO-0),
    while the frozen experts' weights shrink 8x. (Before, the trainable share was taken of the ep-sharded block.)"""
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.auto import lora_search_terms
    from meshwright.launcher.planner.search import Constraints
    from meshwright.memory.lora_cost import lora_step
    from meshwright.plan import LayerStrategy

    model = load_model_config("mixtral-8x7b")
    hw = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype="fp32")
    attn = LoraConfig(rank=16)
    lhw, cons = lora_search_terms(model, attn, hw, Constraints())
    assert cons.ep is None  # searched
    mixed = load_model_config({**model.__dict__, "moe_every": 2})  # dense blocks between: their w1 adapt
    assert lora_search_terms(mixed, LoraConfig(rank=16, targets=["wq", "w1"]), hw, Constraints())[1].ep == 1
    adapters = lora_step(model, attn).adapter[0]
    assert adapters == 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024))  # r * (in + out) of q, o and of k, v (GQA)
    costs = {ep: cm.layer_costs(model, 0, LayerStrategy(dp=8, ep=ep), 1, 4096, lhw) for ep in (1, 8)}
    for ep in (1, 8):
        assert costs[ep]["grads_bytes"] == pytest.approx(4 * adapters), ep
        assert costs[ep]["optimizer_bytes"] == pytest.approx(8 * adapters), ep
    expert = model.n_experts * 3 * model.d_model * model.expert_ffn_dim
    assert costs[1]["params_bytes"] - costs[8]["params_bytes"] == pytest.approx(4 * expert * (1 - 1 / 8))


def test_planner_counts_lora_states_and_plans_only_layouts_lora_runs():
    """plan: auto with lora: gradients and AdamW state for the trainable share only (the frozen base: weights), and
    ep = 1 (a layout check_lora_layout accepts). Llama-3-8B on one A100-80GB: full training (157 GiB) has no layout; LoRA r16 fits."""
    import dataclasses

    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.planner.auto import auto_plan

    hw = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype="fp32")
    lora_hw = dataclasses.replace(hw, trainable_fraction=0.01)
    full, lora = cm.model_state_bytes(1e6, 1, 0, "fp32", hw), cm.model_state_bytes(1e6, 1, 0, "fp32", lora_hw)
    assert lora["params"] == full["params"] == 4e6
    assert (lora["grads"], lora["optimizer"]) == (full["grads"] * 0.01, full["optimizer"] * 0.01) == (4e4, 8e4)

    def cfg(**kw):
        return load_train_config({"model": "llama3-8b", "cluster": "dgx-a100-80g", "seq_len": 2048,
                                  "global_batch": 8, "micro_batch": 1, **kw})

    with pytest.raises(ConfigError, match=r"^plan='auto' found no layout"):
        auto_plan(cfg(), 1)
    plan = auto_plan(cfg(lora={"rank": 16}), 1)
    states = plan.predicted["breakdown"]["mem_states_gib"]
    want = lora_state_bytes(load_model_config("llama3-8b"), LoraConfig(rank=16))
    assert abs(states - sum(want[k] for k in ("weights", "grads", "optimizer")) / 2**30) < 0.2, states
    plan4 = auto_plan(cfg(lora={"rank": 16}), 4)
    assert all(s.ep == 1 for s in plan4.layer_strategies())
    check_lora_layout(cfg(lora={"rank": 16}), plan4)


def test_plan_auto_with_lora_searches_tp_and_pp_and_the_trainer_accepts_its_plan():
    """LoRA runs DTensor tp and pp now (parity: tests/distributed), so the search may pick them: Llama-2-70B r16 on
    16 A100-80GB picks tp 4 x dp 4 (ZeRO-3, sp), predicted 198 s a step where dp 16 alone (the old constraint) takes
    253 s; the plan passes every check the trainer makes before building (validate_plan, check_runtime_support,
    check_lora_layout). With tp_backend megatron (its parallel linears carry the adapters: parallel/megatron_lora.py)
    tp is searched too, as megatron-core runs it (no sp, ZeRO 0 on tp>1 layers): at seq 2048 it picks tp 4 x pp 4,
    105.6 s a step predicted, where tp 1 (the constraint before stop 34) gives dp 16 at ZeRO-3 and 112.6 s."""
    from meshwright.launcher.planner.auto import auto_plan
    from meshwright.launcher.planner.search import Constraints
    from meshwright.parallel.support import check_runtime_support
    from meshwright.plan import validate_plan

    def cfg(**kw):
        return load_train_config({"model": "llama2-70b", "cluster": "dgx-a100-80g", "seq_len": 4096, "global_batch": 32,
                                  "micro_batch": 1, "lora": {"rank": 16}, **kw})

    model_cfg = load_model_config("llama2-70b")
    plan = auto_plan(cfg(), 16)
    strategies = plan.layer_strategies()
    assert max(s.tp for s in strategies) > 1 or plan.pipeline.degree > 1, plan.to_dict()
    validate_plan(plan, model_cfg, 16)
    check_runtime_support(plan, model_cfg, "dtensor", "torch")
    check_lora_layout(cfg(), plan)
    dp_only = auto_plan(cfg(), 16, constraints=Constraints(tp=1, pp=1, micro_batch=1))
    assert plan.predicted["step_s"] < dp_only.predicted["step_s"]
    megatron = auto_plan(cfg(tp_backend="megatron", seq_len=2048), 16)
    assert max(s.tp for s in megatron.layer_strategies()) > 1, megatron.to_dict()
    check_runtime_support(megatron, model_cfg, "megatron", "torch")
    check_lora_layout(cfg(tp_backend="megatron", seq_len=2048), megatron)
    megatron_tp1 = auto_plan(cfg(tp_backend="megatron", seq_len=2048), 16, constraints=Constraints(tp=1))
    assert megatron.predicted["step_s"] < megatron_tp1.predicted["step_s"]


def test_plan_auto_with_lora_never_plans_the_savers_lora_refuses(tmp_path, capsys):
    """--allow fp8/wta-crs with lora: the trainer refuses per-layer FP8 activations and WTA-CRS on LoRA linears
    (check_lora_layout), so plan: auto never picks them (on Llama-3-8B / one A100 an unfiltered search picks both on
    every layer); `plan --emit` with a lora train config is one line (the exports carry no adapters)."""
    from meshwright.cli import main
    from meshwright.launcher.planner.auto import auto_plan
    from meshwright.launcher.planner.search import Allow

    cfg = load_train_config({"model": "llama3-8b", "cluster": "dgx-a100-80g", "seq_len": 2048, "global_batch": 8,
                             "micro_batch": 1, "dtype": "bf16", "lora": {"rank": 16}})
    plan = auto_plan(cfg, 1, allow=Allow(fp8=True, wta_crs=0.3))
    assert not any(s.savers.fp8_act or s.savers.wta_crs is not None for s in plan.layer_strategies())
    path = tmp_path / "lora.yaml"
    path.write_text("model: tiny\nlora: {rank: 4}\n")
    capsys.readouterr()
    assert main(["plan", "--model", "tiny", "--cluster", "dgx-a100-80g", "--seq-len", "64", "--global-batch", "8",
                 "--emit", "megatron", "--train-config", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--train-config lora" in err[0], err


def test_expert_adapters_under_zero3_with_ep_are_refused_in_one_line(tmp_path):
    """ZeRO-2/3 with ep>1 shards the experts over edp (parallel/expert_fsdp.py), not their adapters: expert targets
    there are one line naming lora.targets, ep and zero; attention targets pass."""
    from pathlib import Path

    from meshwright.plan import load_plan

    src = Path(_lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe").plan)
    path = tmp_path / "tiny-moe-ep2-zero3.yaml"
    path.write_text(src.read_text().replace("{dp: 2, ep: 2, repeat: 4}", "{dp: 2, ep: 2, zero: 3, repeat: 4}"))
    plan = load_plan(path)
    assert plan.layer_strategies()[0].zero == 3
    experts = _lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe",
                             lora={"targets": ["wq", "experts.gate_up_proj"]})
    with pytest.raises(ConfigError) as exc:
        check_lora_layout(experts, plan)
    msg = str(exc.value)
    assert msg.startswith("lora.targets=['wq', 'experts.gate_up_proj'] is invalid; valid: attention targets")
    assert "layers[0].ep=2 and zero=3" in msg and "\n" not in msg
    check_lora_layout(_lora_plan_cfg("tiny-moe-ep2.yaml", tmp_path, model="tiny-moe"), plan)
