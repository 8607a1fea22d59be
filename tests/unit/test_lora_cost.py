"""LoRA steps as they run: the FLOPs, DP traffic and optimizer work the planner and the trainer's MFU count, against
torch's own counts (FlopCounterMode, the parameters that have ``requires_grad``)."""

from __future__ import annotations

import dataclasses
import gc
from types import SimpleNamespace

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from meshwright.config import LoraConfig, load_cluster, load_model_config, load_train_config
from meshwright.launcher.planner import cost_model as cm
from meshwright.memory.lora import apply_lora_config
from meshwright.memory.lora_cost import lora_flops_per_token, lora_step
from meshwright.models import build_model, lm_loss
from meshwright.plan import EmbeddingStrategy, LayerStrategy, Plan, validate_plan
from meshwright.tools.flops import full_training_flops_per_token, model_flops_per_token

GB = 1e9
CASES = [  # (model, lora): adapters on attention, on the MLP only (block 0's attention then skips its backward),
    # mixed ranks and targets, a trained head, a trained embedding (block 0 then needs every dX)
    ("tiny", LoraConfig()),
    ("tiny", LoraConfig(targets=["w1"])),
    ("tiny", LoraConfig(rank=4, targets=["wv", "w2"])),
    ("tiny", LoraConfig(modules_to_save=["output"])),
    ("tiny", LoraConfig(targets=["wo"], modules_to_save=["tok_embeddings"])),
    ("tiny-gpt2", LoraConfig(targets=["wq", "wv", "w1", "w2"])),
    ("tiny-gpt2", LoraConfig(modules_to_save=["output"])),  # tied: the embedding trains with the head
]


def counted_flops_per_token(model: torch.nn.Module, seq_len: int, batch: int = 2) -> float:
    """FLOPs torch's counter sees in one forward + backward of the LoRA model (matmuls; on CPU it does not count SDPA)."""
    x = torch.randint(0, model.cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        lm_loss(model(x), x).backward()
    return counter.get_total_flops() / (batch * seq_len)


def not_matmul(cfg, step, seq_len: int) -> float:
    """What the formula holds beside the counted matmuls: the attention core (12 per block, 4 where its backward is
    skipped) and 4 FLOPs per frozen norm weight and bias (palm's 6 less the dW)."""
    attn = sum((12 if step.attn_bwd[i] else 4) * cfg.n_heads * cfg.head_dim * seq_len for i in range(cfg.n_layers))
    gains = (cfg.block_norms() * cfg.n_layers + 1) * cfg.norm_params()
    biases = cfg.n_layers * (4 * cfg.d_model + cfg.ffn_dim + cfg.d_model) if cfg.arch == "gpt2" else 0
    return attn + 4 * (gains + biases)


@pytest.mark.parametrize("name,lora", CASES)
def test_lora_flops_per_token_equal_what_torch_counts(name, lora):
    model = build_model(name, seed=0)
    cfg, t = model.cfg, 64
    apply_lora_config(model, lora, seed=0)
    step = lora_step(cfg, lora)
    predicted = lora_flops_per_token(cfg, step, t)
    assert predicted - not_matmul(cfg, step, t) == counted_flops_per_token(model, t)  # exact
    # the same model fully trained: palm's 6N; LoRA runs ~0.64-0.74 of it on these tiny shapes
    assert 0.6 < predicted / cfg.flops_per_token(t) < 0.75


def test_a_frozen_base_runs_about_4n():
    """At 7B, with r=16 adapters on every linear: forward 2N + dX 2N + attention (all of it) + the adapters' 6 per
    parameter, less the first block's q/k/v dX (their input, the frozen embedding's output, needs no gradient)."""
    cfg = load_model_config("llama2-7b")
    step = lora_step(cfg, LoraConfig(rank=16, targets=["wq", "wk", "wv", "wo", "w1", "w2", "w3"]))
    n = cfg.num_params(non_embedding=True) + cfg.vocab_size * cfg.d_model
    attn = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 4096
    lora = model_flops_per_token(cfg, 4096, lora=step)
    d, r = cfg.d_model, 16
    first = 2 * (3 * d * d + 3 * r * d)  # wq, wk, wv (MHA) and their adapters' A
    assert lora == pytest.approx(4 * n + attn + 6 * sum(step.adapter) - first, rel=1e-12)
    assert lora / full_training_flops_per_token(cfg, 4096) == pytest.approx(0.716, abs=1e-3)  # 0.67 at short seqs
    assert model_flops_per_token(cfg, 4096, "megatron", step) < full_training_flops_per_token(cfg, 4096, "megatron")


def unit_hw(**kw) -> cm.Hardware:
    """1 B/s links without latency: a collective's seconds are its bytes per link."""
    base = dict(peak_flops=1e12, matmul_efficiency=1.0, devices_per_node=8, intra_bw=1.0, intra_lat=0.0,
                inter_bw=1.0, inter_lat=0.0, memory_bytes=80 * cm.GIB, compute_dtype="fp32", overlap_slowdown=0.0,
                overhead_bytes=0.0, fragmentation=0.0, efficiency_half_width=0.0, mem_bw=float("inf"))
    base.update(kw)
    return cm.apply_stack(cm.Hardware(**base), "meshwright")


def lora_hw(cfg, lora, **kw):
    return dataclasses.replace(unit_hw(**kw), lora=lora_step(cfg, lora))


@pytest.mark.parametrize("name,lora", CASES)
def test_planner_model_flops_are_the_lora_step(name, lora):
    """The cost model's per-layer and head FLOPs add up to the LoRA step's (less palm's final norm, which no layer
    holds), and its predicted MFU counts those FLOPs, as the trainer's log does."""
    cfg = load_model_config(name)
    h = lora_hw(cfg, lora)
    t, mb = 64, 2
    plan = Plan(model=name, seq_len=t, global_batch=mb, micro_batch=mb, layers=[LayerStrategy(repeat=cfg.n_layers)])
    validate_plan(plan, cfg, 1)
    flops = sum(cm.layer_costs(cfg, i, plan.layers[0], mb, t, h)["model_flops_mb"] for i in range(cfg.n_layers))
    flops += cm.head_fwd_flops(cfg, mb * t) * h.lora.head_passes()
    expected = lora_flops_per_token(cfg, h.lora, t)
    assert flops / (mb * t) == pytest.approx(expected - 4 * cfg.norm_params(), rel=1e-12)
    p = cm.evaluate_plan(plan, cfg, h, 1)
    assert p.mfu == pytest.approx(expected * mb * t / p.step_s / h.peak_flops, rel=1e-12)
    full = cm.evaluate_plan(plan, cfg, unit_hw(), 1)
    assert p.step_s < full.step_s  # no dW of the frozen base


def trainable_bytes(model: torch.nn.Module, block: int | None = None) -> int:
    """fp32 gradient bytes DDP / FSDP2 reduce: the parameters with requires_grad (of one block, or outside blocks)."""
    out = 0
    for n, p in model.named_parameters():
        if p.requires_grad and ((block is None and not n.startswith("layers.")) or n.startswith(f"layers.{block}.")):
            out += 4 * p.numel()
    return out


@pytest.mark.parametrize("name,lora", [CASES[0], CASES[3], CASES[4], CASES[6]])
def test_dp_traffic_is_the_trainable_gradients_and_zero3_still_gathers_the_base(name, lora):
    model = build_model(name, device="meta")
    cfg = model.cfg
    apply_lora_config(model, lora, seed=0)
    h = lora_hw(cfg, lora)
    dp, t = 2, 32
    # DDP: one all-reduce per step of the gradients: 2 (n-1)/n bytes per link = the gradient bytes at n = 2
    ddp = LayerStrategy(dp=dp, zero=0, repeat=cfg.n_layers)
    for i in range(cfg.n_layers):
        c = cm.layer_costs(cfg, i, ddp, 1, t, h)
        assert c["dp_step"] == pytest.approx(trainable_bytes(model, i), rel=1e-12) and c["dp_step"] > 0
        assert c["dp_mb"] == 0.0
    ends = cm.lora_embedding_trained(cfg, h, True, True, 1) * 4
    assert ends == trainable_bytes(model)
    # FSDP2 (ZeRO-3): every weight all-gathered twice per microbatch (frozen ones too), the gradients reduce-scattered
    z3 = LayerStrategy(dp=dp, zero=3, repeat=cfg.n_layers)
    c = cm.layer_costs(cfg, 1, z3, 1, t, h)
    weights = 4 * cfg.layer_params(1)
    assert c["dp_mb"] == pytest.approx(2 * weights / 2 + trainable_bytes(model, 1) / 2, rel=1e-12)
    full = cm.layer_costs(cfg, 1, z3, 1, t, unit_hw())
    assert full["dp_mb"] == pytest.approx(3 * weights / 2, rel=1e-12)


def test_optimizer_step_and_accumulation_cover_the_trainable_parameters_only():
    cfg = load_model_config("tiny")
    lora = LoraConfig()
    h = lora_hw(cfg, lora, mem_bw=1.0)
    s = LayerStrategy(repeat=cfg.n_layers)
    c, full = cm.layer_costs(cfg, 1, s, 1, 32, h), cm.layer_costs(cfg, 1, s, 1, 32, unit_hw(mem_bw=1.0))
    share = h.lora.adapter[1] / cfg.layer_params(1)
    assert c["opt_step"] == pytest.approx(full["opt_step"] * share, rel=1e-12)
    assert c["accum_mb"] == pytest.approx(full["accum_mb"] * share, rel=1e-12)


def test_trainer_reports_the_lora_step_flops_and_full_trainings_beside_them(tmp_path):
    """The run log's FLOPs per token (MFU's numerator) of a LoRA run are what torch counts in its step (+ the
    attention and norms the convention adds), and the summary keeps full training's 6N count apart."""
    from meshwright.train.local_runtime import LocalRuntime
    from meshwright.train.trainer import Trainer

    cfg = load_train_config({"model": "tiny", "seq_len": 64, "global_batch": 2, "micro_batch": 2, "steps": 1, "warmup_steps": 0,
                             "eval_every": 0, "out_dir": str(tmp_path), "progress": False, "energy": False,
                             "lora": {"rank": 4, "targets": ["wq", "wv", "w2"]}})
    model_cfg = load_model_config("tiny")
    model = build_model(model_cfg, seed=0)
    apply_lora_config(model, cfg.lora, cfg.seed)
    loader = SimpleNamespace(micro_batches_per_step=1, batches_per_pass=1)
    trainer = Trainer(cfg, LocalRuntime(model), loader, None, model_cfg, load_cluster(cfg.cluster), print_fn=lambda s: None)
    step = lora_step(model_cfg, cfg.lora)
    assert trainer.flops_per_token - not_matmul(model_cfg, step, 64) == counted_flops_per_token(model, 64)
    assert trainer.full_flops_per_token == model_cfg.flops_per_token(64)
    tp = trainer.throughput(1000.0, 1.0)
    assert tp["tflops_per_device"] * 1e12 == pytest.approx(1000.0 * trainer.flops_per_token)


@pytest.mark.parametrize("name,lora", [CASES[0], CASES[3], CASES[6]])
def test_dp_bytes_are_what_ddp_buckets_hold(name, lora, tmp_path):
    """DDP itself (a one-rank gloo group) buckets exactly the gradient bytes the cost model reduces per step."""
    import torch.distributed as dist

    cfg = load_model_config(name)
    h = lora_hw(cfg, lora)
    ddp_s = LayerStrategy(dp=2, zero=0, repeat=cfg.n_layers)
    predicted = sum(cm.layer_costs(cfg, i, ddp_s, 1, 32, h)["dp_step"] for i in range(cfg.n_layers))
    predicted += 4 * cm.lora_embedding_trained(cfg, h, True, True, 1)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = build_model(name, seed=0)
        apply_lora_config(model, lora, seed=0)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        x = torch.randint(0, cfg.vocab_size, (1, 16))
        lm_loss(ddp(x), x).backward()
        buckets = sum(int(b) for b in ddp._get_ddp_logging_data()["bucket_sizes"].split(","))
        # DDP's C++ Reducer goes while the group is still registered: freed after destroy_process_group (at this
        # function's return), it held the group's last reference and ran gloo's destructor under the GIL, which
        # joins a worker thread that waits for the GIL to free its last work (a deadlock seen under load)
        del ddp
        gc.collect()
    finally:
        dist.destroy_process_group()
    assert predicted == pytest.approx(buckets, rel=1e-12)
    assert buckets < 0.2 * 4 * sum(p.numel() for p in model.parameters())  # far below the whole model's


@pytest.mark.parametrize("name,lora", CASES)
def test_adapter_widths_and_sizes_are_the_adapted_modules(name, lora):
    """The widths the adapters' memory traffic is costed on (cost_model.lora_elementwise_s) and their parameter
    counts are those of the LoRALinear modules apply_lora builds."""
    from meshwright.memory.lora import LoRALinear

    model = build_model(name, device="meta")
    cfg = model.cfg
    apply_lora_config(model, lora, seed=0)
    step = lora_step(cfg, lora)
    for i in range(cfg.n_layers):
        mods = [m for n, m in model.named_modules() if isinstance(m, LoRALinear) and n.startswith(f"layers.{i}.")]
        assert step.adapter_in[i] == sum(m.in_features for m in mods)
        assert step.adapter_out[i] == sum(m.out_features for m in mods)
        assert step.adapter[i] == sum(m.lora_A.numel() + m.lora_B.numel() for m in mods)
    h = lora_hw(cfg, lora, mem_bw=1.0)
    assert cm.lora_elementwise_s(h.lora, 1, 10.0, 0.0, h) == 10.0 * 4 * (6 * step.adapter_in[1] + 10 * step.adapter_out[1])


def test_lora_model_states_are_counted_per_layer_and_per_end():
    """A LoRA plan's model states, part by part: each block its base weights plus its adapters' (weights, gradients,
    AdamW states), the ends their weights plus the gradients and states of the modules_to_save they hold, each sharded
    by its own ZeRO stage. Until stop 33 the trainable share was spread evenly over all parameters: the head's
    gradients and states (modules_to_save) were sharded with the ZeRO-3 blocks and the adapters' weights left out.
    The total over a replica matches lora_state_bytes (the meta-model count) at ZeRO-0."""
    from meshwright.launcher.planner.auto import lora_search_terms
    from meshwright.launcher.planner.search import Constraints
    from meshwright.memory.lora import lora_state_bytes
    from meshwright.plan import EmbeddingStrategy, LayerStrategy, Plan, validate_plan

    cfg = load_model_config("llama2-7b")
    lora = LoraConfig(rank=16, modules_to_save=["output"])
    base = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype="fp32")
    h, _ = lora_search_terms(cfg, lora, base, Constraints())
    st = lora_step(cfg, lora)
    adapters = sum(st.adapter)
    head = cfg.vocab_size * cfg.d_model
    blocks = sum(cfg.layer_params(i) for i in range(cfg.n_layers))
    ends = cm.embedding_param_count(cfg, True, True, 1)

    def states(zero: int, emb_zero: int, dp: int = 8, hw: cm.Hardware = h) -> float:
        plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                    layers=[LayerStrategy(dp=dp, zero=zero, recompute="full", repeat=cfg.n_layers)],
                    embedding=EmbeddingStrategy(zero=emb_zero))
        validate_plan(plan, cfg, dp)
        return cm.evaluate_plan(plan, cfg, hw, dp).breakdown["mem_states_gib"] * cm.GIB

    want0 = lora_state_bytes(cfg, lora)
    assert states(0, 0) == pytest.approx(sum(want0[k] for k in ("weights", "grads", "optimizer")), rel=1e-9)
    # ZeRO-3 blocks, replicated ends: the blocks' share / 8, the head's gradients and AdamW states whole
    by_hand = (blocks + adapters) * 4 / 8 + adapters * 12 / 8 + ends * 4 + head * 12
    assert states(3, 0) == pytest.approx(by_hand, rel=1e-9)
    # the even spread this replaces (model_state_bytes without per-part counts: hw.trainable_fraction everywhere)
    # sharded most of the head's gradients and states with the blocks: over 1 GB too few on this rank
    assert by_hand - states(3, 0, hw=dataclasses.replace(h, lora=None)) > 1e9


MOE_LORA = {"name": "tiny-moe-lora", "arch": "llama", "vocab_size": 256, "d_model": 32, "n_layers": 2, "n_heads": 4,
            "n_kv_heads": 2, "ffn_hidden": 64, "moe_ffn_hidden": 48, "n_experts": 4, "top_k": 2,
            "capacity_factor": None, "max_seq_len": 64}  # tests/distributed/ep_parity.py's LoRA ep model


def _held_on_ep_rank(cfg, lora, ep: int, rank: int) -> tuple[int, int, int]:
    """(parameters, trainable ones, expert ones) one rank of an ``ep`` group holds once ``apply_ep`` has sliced the
    experts of the LoRA model, on a fake process group of ``ep`` ranks in this one process: the runtime's own code."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from meshwright.parallel.expert_parallel import apply_ep, is_expert_param

    model = build_model(cfg, seed=0)
    apply_lora_config(model, lora, seed=0)
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=ep)
    try:
        apply_ep(model, dist.group.WORLD)
        params = list(dict.fromkeys(model.parameters()))
        return (sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad),
                sum(p.numel() for p in params if is_expert_param(p)))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ep", [2, 4])
def test_check_memory_counts_what_an_ep_rank_holds(ep):
    """Under expert parallelism a LoRA rank holds 1/ep of the frozen experts and the attention adapters (their
    gradients, AdamW's moments), router, norms and ends whole (parallel/expert_parallel.py ``apply_ep``; adapters
    replicated over the ep group). ``ep_rank_state_bytes`` counts exactly that, and ``check_memory`` refuses a
    device that cannot hold it at world = ep (each rank of a dp = ep ZeRO-0 run holds it all). It used to spread the
    whole model's state over the world (experts and adapters alike): at ep 4 a rank's 157,312 bytes were checked
    as 267,904 / 4 = 66,976."""
    from meshwright.errors import ConfigError
    from meshwright.memory.lora_cost import ep_rank_state_bytes
    from meshwright.train.build import check_memory

    cfg = load_model_config(MOE_LORA)
    lora = LoraConfig(rank=4, targets=["wq", "wk", "wv", "wo"])
    held, trainable, experts = _held_on_ep_rank(cfg, lora, ep, rank=ep - 1)
    got = ep_rank_state_bytes(cfg, lora, ep)
    assert (got["weights"], got["grads"], got["optimizer"]) == (4 * held, 4 * trainable, 8 * trainable)
    assert got["expert_weights"] == 4 * experts and got["trainable"] == trainable
    whole = ep_rank_state_bytes(cfg, lora, 1)
    assert whole["trainable"] == trainable  # the adapters are not sharded by ep
    assert whole["weights"] - got["weights"] == 4 * experts * (ep - 1)  # the experts are
    need = got["weights"] + got["grads"] + got["optimizer"]
    check_memory(cfg, ep, available=need, lora=lora, ep=ep)
    with pytest.raises(ConfigError, match=r"^model="):
        check_memory(cfg, ep, available=need - 1, lora=lora, ep=ep)
    # at ep = 1 the figures are lora_state_bytes' (spread over every device, as before)
    from meshwright.memory.lora import lora_state_bytes

    old = lora_state_bytes(cfg, lora)
    assert (whole["weights"], whole["grads"], whole["optimizer"]) == (old["weights"], old["grads"], old["optimizer"])


def test_the_plans_ep_is_counted_only_where_nothing_shards_the_replicated_part():
    from meshwright.train.build import lora_plan_ep

    plan = Plan(model="tiny-moe-lora", cluster={}, seq_len=16, global_batch=8, micro_batch=2,
                layers=[LayerStrategy(dp=4, ep=4, repeat=2)])
    assert lora_plan_ep(plan) == 4 and lora_plan_ep(None) == 1
    assert lora_plan_ep(dataclasses.replace(plan, embedding=EmbeddingStrategy(zero=3))) == 1
    assert lora_plan_ep(dataclasses.replace(plan, layers=[LayerStrategy(dp=4, ep=4, zero=1, repeat=2)])) == 1


# ---- LoRA on the experts (``experts.gate_up_proj`` / ``experts.down_proj``: memory/lora.py ExpertAdapter) ---------

# tests/distributed/ep_parity.py's LORA_EXPERTS
LORA_EXPERTS = LoraConfig(rank=4, alpha=8.0, targets=["wq", "wv", "experts.gate_up_proj", "experts.down_proj"])


@pytest.mark.parametrize("targets", [["experts.gate_up_proj", "experts.down_proj"], ["experts.down_proj"],
                                     ["experts.gate_up_proj"], LORA_EXPERTS.targets])
def test_expert_adapter_flops_equal_what_torch_counts(targets):
    """The expert adapters' 6 FLOPs per active parameter (a token's top_k experts': r (d + 2 f_e) on gate_up,
    r (f_e + d) on down), and the frozen experts' input gradients they make necessary: with expert adapters only,
    block 0's router, w1 and w3 still skip their dX (nothing below trains) but w2's runs where gate_up trains, and
    block 1 pays every dX. ``lora_step`` counted none of it (up to half of the step's FLOPs missing on this model)."""
    cfg = load_model_config(MOE_LORA)
    lora = LoraConfig(rank=4, targets=targets)
    model = build_model(cfg, seed=0)
    apply_lora_config(model, lora, seed=0)
    step = lora_step(cfg, lora)
    t = 64
    assert lora_flops_per_token(cfg, step, t) - not_matmul(cfg, step, t) == counted_flops_per_token(model, t)  # exact


def _expert_adapter_shapes(cfg, lora) -> list[tuple[int, int, int]]:
    """Per block (parameters, per-token input width, output width) of the ExpertAdapters apply_lora_config builds."""
    from meshwright.memory.lora import ExpertAdapter

    model = build_model(cfg, device="meta")
    apply_lora_config(model, lora, seed=0)
    out = []
    for i in range(cfg.n_layers):
        mods = [m for n, m in model.named_modules() if isinstance(m, ExpertAdapter) and n.startswith(f"layers.{i}.")]
        out.append((sum(m.lora_A.numel() + m.lora_B.numel() for m in mods),
                    cfg.top_k * sum(m.lora_A.shape[2] for m in mods), cfg.top_k * sum(m.lora_B.shape[1] for m in mods)))
    return out


@pytest.mark.parametrize("ep", [1, 2, 4])
def test_planner_counts_expert_adapters_as_an_ep_rank_holds_them(ep):
    """Per rank the planner's trainable parameters, gradients and AdamW bytes are the linear adapters whole over ep
    and the expert adapters / ep: what ``apply_ep`` leaves on a rank (a fake process group), ``lora_adapter_params``
    and ``ep_rank_state_bytes`` (``expert_share`` counts ExpertAdapter rows 1/ep). ep_parity's model and targets:
    4,224 at ep 2 and 2,560 at ep 4, the counts its lora_experts rows trained with. The planner counted the linear
    adapters alone (896 on every rank)."""
    from meshwright.memory.lora import lora_adapter_params
    from meshwright.memory.lora_cost import ep_rank_state_bytes

    cfg = load_model_config(MOE_LORA)
    want = {1: 7552, 2: 4224, 4: 2560}[ep]
    if ep > 1:
        _, trainable, _ = _held_on_ep_rank(cfg, LORA_EXPERTS, ep, rank=ep - 1)
        assert trainable == want
    assert lora_adapter_params(cfg, LORA_EXPERTS, ep) == want
    assert ep_rank_state_bytes(cfg, LORA_EXPERTS, ep)["trainable"] == want
    h = lora_hw(cfg, LORA_EXPERTS)
    step = h.lora
    s = LayerStrategy(dp=4, ep=ep, recompute="none")
    costs = [cm.layer_costs(cfg, i, s, 1, 64, h) for i in range(cfg.n_layers)]
    # AdamW in fp32 at ZeRO-0: 4 B of gradient and 8 B of moments per trainable parameter on the rank
    assert sum(c["grads_bytes"] for c in costs) == pytest.approx(4 * want)
    assert sum(c["optimizer_bytes"] for c in costs) == pytest.approx(8 * want)
    assert sum(step.trained_on_rank(i, 1, ep) for i in range(cfg.n_layers)) == want
    assert sum(step.expert_on_rank(i, ep) for i in range(cfg.n_layers)) == lora_adapter_params(
        cfg, LORA_EXPERTS, ep, experts_only=True)
    for i, (n, w_in, w_out) in enumerate(_expert_adapter_shapes(cfg, LORA_EXPERTS)):
        assert step.expert_adapter[i] == n and (step.expert_in[i], step.expert_out[i]) == (w_in, w_out)
    # the scalar and the search's vectorised paths agree
    for i in range(cfg.n_layers):
        cols = cm.StrategyColumns(cfg, i, [s], h)
        assert cm.layer_costs_columns(cfg, i, cols, 4, 64, h, "fp32", {})[:, 0] == pytest.approx(
            cm.layer_costs(cfg, i, s, 1, 64, h, lean=True))
    # under tp (meshwright keeps the experts and their adapters whole on every tp rank) the expert part stays / ep
    t2 = LayerStrategy(tp=2, dp=4, ep=ep, recompute="none")
    for i in range(cfg.n_layers):
        c = cm.layer_costs(cfg, i, t2, 1, 64, h)
        assert c["grads_bytes"] == pytest.approx(4 * (step.on_rank(i, 2) + step.expert_adapter[i] / ep))
