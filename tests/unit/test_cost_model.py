"""Every cost-model term against a hand calculation, and the memory model against measured saved bytes."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from meshwright.config import load_cluster, load_model_config
from meshwright.launcher.planner import cost_model as cm
from meshwright.plan import EmbeddingStrategy, LayerStrategy, PipelineSpec, Plan, validate_plan

GB = 1e9


def hw(**kw) -> cm.Hardware:
    base = dict(peak_flops=100e12, matmul_efficiency=1.0, devices_per_node=8, intra_bw=100 * GB, intra_lat=1e-5,
                inter_bw=10 * GB, inter_lat=1e-4, memory_bytes=80 * cm.GIB, compute_dtype="bf16",
                overlap_slowdown=0.0, overhead_bytes=0.0, fragmentation=0.0, efficiency_half_width=0.0,
                mem_bw=float("inf"))
    base.update(kw)
    return cm.Hardware(**base)


# ---- collectives ---------------------------------------------------------------------------------

def test_ring_collectives_match_alpha_beta_hand_calculation():
    assert cm.allreduce_s(1e9, 8, 100 * GB, 1e-5) == pytest.approx(2 * 7 * 1e-5 + 2 * 7 / 8 * 1e9 / (100 * GB))
    assert cm.allgather_s(1e9, 4, 10 * GB, 1e-4) == pytest.approx(3 * 1e-4 + 0.75 * 0.1)
    assert cm.reduce_scatter_s(1e9, 4, 10 * GB, 1e-4) == cm.allgather_s(1e9, 4, 10 * GB, 1e-4)
    assert cm.alltoall_s(8e8, 8, 100 * GB, 0.0) == pytest.approx(7 / 8 * 8e8 / (100 * GB))
    assert cm.p2p_s(1e9, 10 * GB, 1e-4) == pytest.approx(1e-4 + 0.1)
    for fn in (cm.allreduce_s, cm.allgather_s, cm.alltoall_s):
        assert fn(1e9, 1, GB, 1.0) == 0.0  # one rank talks to nobody
    # an all-reduce is a reduce-scatter followed by an all-gather
    assert cm.allreduce_s(1e9, 8, GB, 1e-5) == pytest.approx(cm.reduce_scatter_s(1e9, 8, GB, 1e-5) + cm.allgather_s(1e9, 8, GB, 1e-5))


def test_link_is_nvlink_inside_a_node_and_ib_across():
    h = hw()
    assert cm.link(h, 8, 1) == (h.intra_bw, h.intra_lat)
    assert cm.link(h, 4, 2) == (h.intra_bw, h.intra_lat)
    assert cm.link(h, 2, 8) == (h.inter_bw, h.inter_lat)  # dp group strided over tp=8 crosses nodes
    assert cm.link(h, 16, 1) == (h.inter_bw, h.inter_lat)


def test_overlap_hides_the_shorter_and_pays_a_contention_penalty():
    assert cm.overlap_s(1.0, 0.4, 0.0) == 1.0
    assert cm.overlap_s(1.0, 0.4, 0.25) == pytest.approx(1.1)
    assert cm.exposed_s(1.0, 1.5, 0.0) == pytest.approx(0.5)
    assert cm.exposed_s(1.0, 0.5, 0.0) == 0.0


# ---- compute -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama2-7b", "megatron-gpt-18.4b", "mixtral-8x7b"])
def test_layer_and_head_flops_add_up_to_the_models_flops_per_token(name):
    cfg = load_model_config(name)
    s = 2048
    total = sum(3 * cm.layer_fwd_flops(cfg, i, 1.0, s) for i in range(cfg.n_layers)) + 3 * cm.head_fwd_flops(cfg, 1.0)
    # the model's count also includes the final norm's parameters (6*d FLOPs): negligible
    assert total == pytest.approx(cfg.flops_per_token(s), rel=1e-6)


def test_compute_time_is_flops_over_achieved_throughput():
    h = hw(matmul_efficiency=0.5, efficiency_half_width=100.0)
    assert cm.matmul_efficiency(h, 100.0) == pytest.approx(0.25)
    assert cm.compute_s(1e12, h, 100.0) == pytest.approx(1e12 / (100e12 * 0.25))


def test_elementwise_kernels_are_bandwidth_bound():
    cfg = load_model_config("llama2-7b")
    h = hw(mem_bw=1e12)
    h_, f_ = cfg.d_model, cfg.ffn_dim
    want = (16 * h_ + 5 * f_) * 4096 * 2 / 1e12
    assert cm.elementwise_s(cfg, 0, 4096, 1, False, h) == pytest.approx(want)
    assert cm.elementwise_s(cfg, 0, 4096, 4, True, h) == pytest.approx(want / 4)
    assert cm.elementwise_s(cfg, 0, 4096, 4, False, h) == pytest.approx((16 * h_ + 5 * f_ / 4) * 4096 * 2 / 1e12)
    assert cm.device_memory_bw("A100-SXM4-80GB") == pytest.approx(0.8 * 2.039e12)


def test_recompute_extra_work():
    cfg = load_model_config("llama2-7b")
    assert cm.recompute_extra_fwd_fraction(cfg, 0, 4096, "none") == 0.0
    assert cm.recompute_extra_fwd_fraction(cfg, 0, 4096, "full") == 1.0
    sel = cm.recompute_extra_fwd_fraction(cfg, 0, 4096, "selective")
    attn = 4 * 4096 * cfg.d_model
    assert sel == pytest.approx(attn / (2 * cfg.layer_params(0) + attn))
    assert 0 < sel < 1


# ---- per-layer communication ---------------------------------------------------------------------

def test_tp_collectives_per_layer():
    cfg = load_model_config("llama2-7b")
    h = hw()
    tokens = 4096
    one = cm.allreduce_s(tokens * cfg.d_model * 2, 8, h.intra_bw, h.intra_lat)
    assert cm.tp_comm_s(tokens, cfg, 8, False, "none", h) == pytest.approx(4 * one)  # 2 fwd + 2 bwd
    assert cm.tp_comm_s(tokens, cfg, 8, True, "none", h) == pytest.approx(4 * one)  # SP: same bus volume
    assert cm.tp_comm_s(tokens, cfg, 8, False, "full", h) == pytest.approx(6 * one)  # recomputed forward
    assert cm.tp_comm_s(tokens, cfg, 1, False, "none", h) == 0.0


def test_dp_and_zero_traffic():
    h = hw()
    n = 1e9  # parameters on this shard
    ar = cm.allreduce_s(n * 2, 8, h.intra_bw, h.intra_lat)
    ag = cm.allgather_s(n * 2, 8, h.intra_bw, h.intra_lat)
    assert cm.dp_comm_s(n, 8, 0, 1, h) == (0.0, pytest.approx(ar))
    assert cm.dp_comm_s(n, 8, 1, 1, h) == (0.0, pytest.approx(ar))
    assert cm.dp_comm_s(n, 8, 2, 1, h) == (pytest.approx(ag), pytest.approx(ag))
    per_mb, per_step = cm.dp_comm_s(n, 8, 3, 1, h)
    assert per_mb == pytest.approx(3 * ag) and per_step == 0.0  # 1.5x the all-reduce volume (ZeRO paper)
    assert cm.dp_comm_s(n, 1, 3, 1, h) == (0.0, 0.0)
    # a dp group strided over tp=8 ranks leaves the node
    assert cm.dp_comm_s(n, 2, 0, 8, h)[1] == pytest.approx(cm.allreduce_s(n * 2, 2, h.inter_bw, h.inter_lat))


def test_ep_alltoall_bytes_and_time():
    cfg = load_model_config("mixtral-8x7b")
    h = hw()
    assert cm.ep_alltoall_bytes(4096, cfg, 2) == 4096 * 4096 * 2 * 2
    t = cm.ep_comm_s(4096, cfg, 8, 1, "none", h)
    assert t == pytest.approx(4 * cm.alltoall_s(4096 * 4096 * 2 * 2, 8, h.intra_bw, h.intra_lat))
    assert cm.ep_comm_s(4096, cfg, 1, 1, "none", h) == 0.0


def test_redistribution_only_when_layout_changes():
    cfg = load_model_config("llama2-7b")
    h = hw()
    assert cm.redistribution_s(4096, cfg, (2, True), (2, True), h) == 0.0
    want = 2 * cm.allgather_s(4096 * cfg.d_model * 2, 4, h.intra_bw, h.intra_lat)
    assert cm.redistribution_s(4096, cfg, (2, True), (4, True), h) == pytest.approx(want)


# ---- pipeline ------------------------------------------------------------------------------------

def test_pipeline_bubble_and_step_time():
    assert cm.bubble_fraction(4, 8, "1f1b") == pytest.approx(3 / 8)
    assert cm.bubble_fraction(4, 8, "gpipe") == pytest.approx(3 / 8)
    assert cm.bubble_fraction(4, 8, "interleaved_1f1b", 2) == pytest.approx(3 / 16)
    assert cm.bubble_fraction(1, 8, "1f1b") == 0.0
    t = 0.1
    assert cm.pipeline_step_s([t] * 4, 8, "1f1b") == pytest.approx((8 + 3) * t)
    assert cm.pipeline_step_s([t] * 4, 8, "interleaved_1f1b", 2) == pytest.approx((8 + 1.5) * t)
    assert cm.pipeline_step_s([t, 2 * t], 4, "1f1b") == pytest.approx(4 * 2 * t + t)  # slowest stage paces


def test_microbatches_in_flight():
    assert [cm.inflight_microbatches("1f1b", 4, s, 16) for s in range(4)] == [4, 3, 2, 1]
    assert cm.inflight_microbatches("gpipe", 4, 3, 16) == 16
    assert cm.inflight_microbatches("1f1b", 8, 0, 2) == 2  # never more than exist
    assert cm.inflight_microbatches("interleaved_1f1b", 4, 0, 16, 2) == pytest.approx(4 + 2)
    assert cm.inflight_microbatches("1f1b", 1, 0, 16) == 1


def test_p2p_per_stage_boundary():
    cfg = load_model_config("llama2-7b")
    h = hw()
    nbytes = 4096 * cfg.d_model * 2
    assert cm.pp_p2p_s(4096, cfg, 1, False, h, True) == pytest.approx(2 * cm.p2p_s(nbytes, h.inter_bw, h.inter_lat))
    assert cm.pp_p2p_s(4096, cfg, 4, True, h, False) == pytest.approx(2 * cm.p2p_s(nbytes / 4, h.intra_bw, h.intra_lat))


# ---- memory --------------------------------------------------------------------------------------

def test_optimizer_and_model_state_bytes():
    assert cm.optimizer_bytes_per_param("fp32", True) == 12.0  # m, v fp32 + fp32 master
    assert cm.optimizer_bytes_per_param("fp32", False) == 8.0
    # COAT: 2 FP8 moments + 2 x 12 B of group metadata (scale, centre, exponent) per 128 values + fp32 master
    assert cm.optimizer_bytes_per_param("fp8", True) == pytest.approx(2 + 24 / 128 + 4)
    h = hw()
    n = 1e9
    z0 = cm.model_state_bytes(n, 8, 0, "fp32", h)
    assert z0 == {"params": 2e9, "grads": 2e9, "optimizer": 12e9}  # 16 B/param (ZeRO paper)
    z1 = cm.model_state_bytes(n, 8, 1, "fp32", h)
    assert z1["optimizer"] == 12e9 / 8 and z1["grads"] == 2e9
    z2 = cm.model_state_bytes(n, 8, 2, "fp32", h)
    assert z2["grads"] == 2e9 / 8 and z2["params"] == 2e9
    z3 = cm.model_state_bytes(n, 8, 3, "fp32", h)
    assert sum(z3.values()) == pytest.approx(16e9 / 8)


def test_activation_formula_structure_follows_korthikanti():
    cfg = load_model_config("megatron-gpt-18.4b")
    tok = 2048.0
    h, f = cfg.d_model, cfg.ffn_dim
    base = cm.activation_bytes(cfg, 0, tok, 1, False, "none", 2)
    assert base == pytest.approx(tok * 2 * (4 * h + 4 * h + 2 * f))  # 34sbh less the 2 dropout masks
    # without SP only part shrinks with tp; with SP everything does (34sbh/t in the paper)
    t8 = cm.activation_bytes(cfg, 0, tok, 8, False, "none", 2)
    assert t8 == pytest.approx(tok * 2 * (4 * h + (4 * h + 2 * f) / 8))  # (10 + 24/t)sbh less masks
    assert cm.activation_bytes(cfg, 0, tok, 8, True, "none", 2) == pytest.approx(base / 8)
    # full recomputation keeps the block input only (2sbh bytes in bf16; /t with SP)
    assert cm.activation_bytes(cfg, 0, tok, 8, False, "full", 2) == pytest.approx(tok * h * 2)
    assert cm.activation_bytes(cfg, 0, tok, 8, True, "full", 2) == pytest.approx(tok * h * 2 / 8)
    sel = cm.activation_bytes(cfg, 0, tok, 8, True, "selective", 2)
    assert cm.activation_bytes(cfg, 0, tok, 8, True, "full", 2) < sel < cm.activation_bytes(cfg, 0, tok, 8, True, "none", 2)


def test_savers_shrink_activations_as_stated():
    cfg = load_model_config("llama2-7b")
    base = cm.activation_bytes(cfg, 0, 4096, 1, False, "none", 2)
    fp8 = cm.activation_bytes(cfg, 0, 4096, 1, False, "none", 2, fp8_act=True)
    from meshwright.memory.fp8_activations import block_saved_bytes_per_token

    # the FP8 block is counted tensor by tensor (what count_saved_bytes measures, under bf16 autocast too)
    assert fp8 == pytest.approx(4096 * block_saved_bytes_per_token(cfg, True, dtype_bytes=2))
    assert 0.3 < fp8 / base < 0.7
    assert cm.activation_bytes(cfg, 0, 4096, 1, False, "none", 2, lemo=0.5) == pytest.approx(base / 2)
    wta = cm.activation_bytes(cfg, 0, 4096, 1, False, "none", 2, wta_crs=0.3)
    assert wta == pytest.approx(base * (1 - cm.LINEAR_INPUT_SHARE * 0.7))


@pytest.mark.parametrize("name,tp", [("tiny", 1), ("tiny", 2), ("tiny-gpt2", 1), ("tiny-gpt2", 2), ("gqa", 1), ("gqa", 4),
                                     ("wide_heads", 1), ("wide_heads", 2), ("qwen3", 1), ("qwen3", 2)])
def test_memory_model_matches_measured_saved_bytes(name, tp):
    """Analytic activation bytes vs bytes saved for backward, measured with saved_tensors_hooks on CPU. wide_heads:
    head_dim 96 for 8 heads of d_model 256 (the attention tensors are 3x d_model wide; they were counted d_model wide,
    36% under); qwen3: the same with q/k head norms (their inputs, outputs and 1/rms, another 30%)."""
    from meshwright.launcher.profiling.blocks import shard_block
    from meshwright.launcher.profiling.model import saved_bytes_per_token

    if name in ("gqa", "wide_heads", "qwen3"):
        cfg = dataclasses.replace(load_model_config("tiny"), d_model=256, n_heads=8, n_kv_heads=4, ffn_hidden=768)
        if name != "gqa":
            cfg = dataclasses.replace(cfg, attn_head_dim=96, qk_norm=name == "qwen3")
    else:
        cfg = load_model_config(name)
    torch.manual_seed(0)
    block = shard_block(cfg, 0, tp)
    measured = saved_bytes_per_token(block, cfg, 2, 64, torch.device("cpu"))
    predicted = cm.activation_bytes(cfg, 0, 1.0, tp, False, "none", 4)
    assert measured == pytest.approx(predicted, rel=0.08), (measured, predicted)


def test_embedding_and_logits_terms():
    cfg = load_model_config("llama2-7b")
    V, d = cfg.vocab_size, cfg.d_model
    assert cm.embedding_param_count(cfg, True, False, 2) == V * d / 2
    assert cm.embedding_param_count(cfg, False, True, 2) == V * d / 2 + d
    assert cm.embedding_param_count(cfg, True, True, 1) == 2 * V * d + d
    assert cm.logits_bytes(cfg, 4096, 2, 2) == 4096 * V / 2 * 6
    h = hw(overhead_bytes=1.0, fragmentation=0.1)
    assert cm.framework_overhead_bytes(h, 100.0) == pytest.approx(11.0)


# ---- whole plan ----------------------------------------------------------------------------------

def test_single_device_plan_by_hand():
    cfg = load_model_config("tiny")
    h = hw(compute_dtype="fp32")
    plan = Plan(model="tiny", seq_len=128, global_batch=4, micro_batch=2, layers=[LayerStrategy(repeat=cfg.n_layers)])
    validate_plan(plan, cfg, 1)
    p = cm.evaluate_plan(plan, cfg, h, 1)
    tokens_mb = 2 * 128
    layer = 3 * cm.layer_fwd_flops(cfg, 0, tokens_mb, 128) / h.peak_flops
    head = 3 * cm.head_fwd_flops(cfg, tokens_mb) / h.peak_flops
    assert p.step_s == pytest.approx(2 * (cfg.n_layers * layer + head))  # two microbatches, nothing to overlap
    assert p.mfu == pytest.approx(cfg.flops_per_token(128) * 4 * 128 / p.step_s / h.peak_flops)
    assert p.hfu == pytest.approx(p.mfu)
    assert p.tokens_per_s == pytest.approx(4 * 128 / p.step_s)
    states = cfg.num_params() * (4 + 4 + 8)  # fp32: params, grads, m and v
    acts = cfg.n_layers * cm.activation_bytes(cfg, 0, tokens_mb, 1, False, "none", 4) + cm.logits_bytes(cfg, tokens_mb, 1, 4)
    assert p.memory_gib[0] * cm.GIB == pytest.approx(states + acts)


def test_recompute_trades_time_for_memory_and_raises_hfu_over_mfu():
    cfg = load_model_config("llama2-7b")
    h = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"))
    mk = lambda rc: Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,  # noqa: E731
                         layers=[LayerStrategy(tp=8, sp=True, dp=1, recompute=rc, repeat=32)])
    none, full = (cm.evaluate_plan(mk(rc), cfg, h, 8) for rc in ("none", "full"))
    assert full.step_s > none.step_s and max(full.memory_gib) < max(none.memory_gib)
    assert full.hfu > full.mfu and none.hfu == pytest.approx(none.mfu)
    assert full.hfu / full.mfu == pytest.approx(4 / 3, rel=0.05)


def test_pipeline_plan_memory_per_stage_follows_1f1b():
    cfg = load_model_config("llama2-13b")
    h = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"))
    plan = Plan(model="llama2-13b", seq_len=4096, global_batch=64, micro_batch=1,
                pipeline=PipelineSpec(degree=4, schedule="1f1b", microbatches=64),
                layers=[LayerStrategy(tp=2, sp=True, dp=1, repeat=cfg.n_layers)])
    validate_plan(plan, cfg, 8)
    p = cm.evaluate_plan(plan, cfg, h, 8)
    assert len(p.memory_gib) == 4
    # stage 0 keeps 4 microbatches, stage 2 keeps 2: the middle stages differ by activations only
    assert p.memory_gib[0] > p.memory_gib[1] > p.memory_gib[2]
    assert p.breakdown["bubble_fraction"] == pytest.approx(3 / 64)


def test_hardware_from_cluster_and_profile_override():
    cl = load_cluster("dgx-a100-80g")
    h = cm.hardware_from_cluster(cl)
    assert h.peak_flops == 312e12 and h.compute_dtype == "bf16" and h.elem_bytes == 2
    assert h.intra_bw == 300e9 and h.inter_bw == 25e9
    cpu = cm.hardware_from_cluster(load_cluster("local-cpu"))
    assert cpu.compute_dtype == "fp32" and cpu.elem_bytes == 4 and not cpu.mixed_precision
    prof = {"derived": {"peak_tflops": {"bf16": 250.0}, "intra_bw_gbps": 200.0, "intra_latency_us": 5.0,
                        "inter_bw_gbps": 20.0, "inter_latency_us": 20.0, "overlap_slowdown": 0.2}}
    hp = cm.hardware_from_cluster(cl, prof, memory_budget_gib=70)
    assert hp.peak_flops == 250e12 and hp.matmul_efficiency == 1.0 and hp.intra_bw == 200e9
    assert hp.overlap_slowdown == 0.2 and hp.memory_bytes == 70 * cm.GIB
    with pytest.raises(Exception, match="memory_budget_gib"):
        cm.hardware_from_cluster(cl, None, memory_budget_gib=0)
    assert math.isfinite(h.matmul_efficiency)


def test_a_profiled_device_caps_the_presets_memory():
    """A hardware profile records the memory CUDA says the device holds (``device.memory_gib``); the planner's budget
    is the preset's or that, whichever is smaller, and ``--memory-budget-gib`` still decides over both."""
    cl = load_cluster("dgx-h100-80g")
    assert cm.hardware_from_cluster(cl).memory_bytes == 79.1 * cm.GIB  # CUDA's total on an 80 GB card, not 80.0
    derived = {"peak_tflops": {"bf16": 800.0}, "intra_bw_gbps": 200.0, "intra_latency_us": 5.0, "inter_bw_gbps": 20.0,
               "inter_latency_us": 20.0, "overlap_slowdown": 0.2}
    for measured, budget in ((74.5, 74.5), (93.0, 79.1), (None, 79.1)):  # a smaller card, a larger one, a CPU profile
        prof = {"derived": derived, "device": {"type": "cuda", "memory_gib": measured}}
        assert cm.hardware_from_cluster(cl, prof).memory_bytes == budget * cm.GIB, measured
    assert cm.hardware_from_cluster(cl, {"derived": derived}).memory_bytes == 79.1 * cm.GIB  # profiles before the field
    prof = {"derived": derived, "device": {"type": "cuda", "memory_gib": 74.5}}
    assert cm.hardware_from_cluster(cl, prof, memory_budget_gib=78).memory_bytes == 78 * cm.GIB


# ---- framework overhead of parallel layouts (runtime_profile) -------------------------------------

def test_strategy_overhead_picks_the_profiled_layout_by_hand():
    h = hw(strategy_overheads=(("tp2", 1e-3, 1e-6), ("tp2sp", 2e-3, 0.0), ("tp4", 3e-3, 0.0), ("zero2", 5e-4, 2e-7)))
    assert cm.strategy_overhead_s(h, 1, False, 0, 1, 1000) == 0.0
    assert cm.strategy_overhead_s(h, 2, False, 0, 1, 1000) == pytest.approx(1e-3 + 1e-6 * 1000)
    assert cm.strategy_overhead_s(h, 2, True, 0, 1, 1000) == pytest.approx(2e-3)
    assert cm.strategy_overhead_s(h, 8, False, 0, 1, 1000) == pytest.approx(3e-3)  # largest profiled tp below 8
    assert cm.strategy_overhead_s(h, 4, True, 0, 1, 1000) == pytest.approx(2e-3)  # tp2sp stands in for tp4sp
    # ZeRO-2 hooks only where there is a dp group to shard over; ZeRO-3 was not profiled: nothing
    assert cm.strategy_overhead_s(h, 1, False, 2, 4, 1000) == pytest.approx(5e-4 + 2e-7 * 1000)
    assert cm.strategy_overhead_s(h, 1, False, 2, 1, 1000) == 0.0
    assert cm.strategy_overhead_s(h, 1, False, 3, 4, 1000) == 0.0
    assert cm.strategy_overhead_s(h, 2, False, 2, 4, 1000) == pytest.approx(2e-3 + 7e-4)
    assert cm.strategy_overhead_s(hw(), 2, True, 3, 4, 1000) == 0.0  # no profile: the analytic model alone


def test_strategy_overhead_enters_step_time_once_per_layer_and_microbatch():
    cfg = load_model_config("tiny")
    plan = Plan(model="tiny", seq_len=128, global_batch=16, micro_batch=4,
                layers=[LayerStrategy(tp=2, sp=False, dp=1, repeat=cfg.n_layers)])
    base = hw(peak_flops=1e11, devices_per_node=2)
    with_oh = dataclasses.replace(base, strategy_overheads=(("tp2", 0.01, 0.0),))
    p0, p1 = cm.evaluate_plan(plan, cfg, base, 2), cm.evaluate_plan(plan, cfg, with_oh, 2)
    m = 16 // 4  # microbatches
    assert p1.step_s - p0.step_s == pytest.approx(0.01 * cfg.n_layers * m)
    assert p1.breakdown["framework_overhead_s"] == pytest.approx(0.01 * cfg.n_layers * m)


def test_overhead_fits_recover_the_part_the_model_does_not_explain():
    from meshwright.launcher.profiling.overhead import modelled_comm_s, overhead_fits

    cfg = load_model_config("tiny")
    h = hw(intra_bw=1 * GB, intra_lat=1e-4, devices_per_node=2, compute_dtype="fp32")

    def entry(tp, sp, zero, a, b, group):
        e = {"kind": "dense", "layer_index": 0, "tp": tp, "sp": sp, "zero": zero, "group_size": group, "points": []}
        for tokens in (64, 128, 256, 512):
            plain = 1e-5 * tokens
            e["points"].append({"tokens": tokens, "seq": 64, "plain_s": plain,
                                "runtime_s": plain + modelled_comm_s(cfg, e, tokens, h) + a + b * tokens})
        return e

    prof = {"runtime_overheads": [entry(2, True, 0, 0.017, 2e-6, 2), entry(1, False, 2, 0.004, 0.0, 2),
                                  {**entry(2, False, 0, 0.01, 0.0, 2), "kind": "moe"}]}
    fits = dict((k, (a, b)) for k, a, b in overhead_fits(prof, cfg, h))
    assert set(fits) == {"tp2sp", "zero2"}  # MoE entries do not override the dense ones
    assert fits["tp2sp"] == pytest.approx((0.017, 2e-6), rel=1e-6)
    assert fits["zero2"][0] == pytest.approx(0.004, rel=1e-6) and fits["zero2"][1] == pytest.approx(0.0, abs=1e-12)
    # the communication term is not counted twice: it is what the modelled collectives predict
    assert modelled_comm_s(cfg, prof["runtime_overheads"][0], 512, h) == pytest.approx(cm.tp_comm_s(512, cfg, 2, True, "none", h))
    # times measured on a slower host shrink by the speed ratio, and a runtime faster than the model clamps at 0
    half = dict((k, (a, b)) for k, a, b in overhead_fits(prof, cfg, h, speed_ratio=2.0))
    assert half["tp2sp"][0] == pytest.approx(0.0085, rel=1e-6)
    neg = {"runtime_overheads": [entry(2, False, 0, -0.5, 0.0, 2)]}
    assert overhead_fits(neg, cfg, h) == (("tp2", 0.0, 0.0),)


def test_materialized_attention_costs_score_traffic_and_memory_by_hand():
    """Megatron-LM 2021 wrote the b·a·s² scores to memory: 13 B per element moved forward (2-byte elements)
    and Korthikanti's 5 B per element saved; flash kernels (the default) have neither."""
    cfg = load_model_config("megatron-gpt-1.7b")
    flash = hw(mem_bw=1e12)
    mat = dataclasses.replace(flash, attention="materialized")
    tokens, seq, tp = 2048.0, 2048, 2
    elems = tokens * cfg.n_heads / tp * seq
    assert cm.attention_scores_s(cfg, tokens, seq, tp, flash) == 0.0
    assert cm.attention_scores_s(cfg, tokens, seq, tp, mat) == pytest.approx(elems * 13 / 1e12)
    assert cm.attention_score_bytes(cfg, tokens, seq, tp, "none", mat) == pytest.approx(elems * 5)
    assert cm.attention_score_bytes(cfg, tokens, seq, tp, "selective", mat) == 0.0  # the core is recomputed
    s = LayerStrategy(tp=tp, sp=True, dp=1)
    c0, c1 = cm.layer_costs(cfg, 0, s, 1, seq, flash), cm.layer_costs(cfg, 0, s, 1, seq, mat)
    assert c1["fwd_mb"] - c0["fwd_mb"] == pytest.approx(elems * 13 / 1e12)
    assert c1["act_bytes"] - c0["act_bytes"] == pytest.approx(elems * 5)
    with pytest.raises(Exception, match="attention"):
        cm.attention_scores_s(cfg, tokens, seq, tp, dataclasses.replace(flash, attention="paged"))


def test_pipeline_fill_and_drain_run_faster_where_ranks_share_cores():
    t = 0.1
    assert cm.pipeline_step_s([t, t], 2, "1f1b", contention=1.0) == pytest.approx(3 * t)
    # 4 ranks on 2 cores (contention 2): during fill/drain only one stage's ranks work, at full speed
    assert cm.pipeline_step_s([t, t], 2, "1f1b", contention=2.0) == pytest.approx(2.5 * t)
    assert cm.pipeline_step_s([t, t], 2, "1f1b", contention=0.5) == pytest.approx(3 * t)  # never below 1
    from meshwright.launcher.profiling.hardware import contention

    rows = [{"seconds": 2.0, "solo_seconds": 1.0}, {"seconds": 2.4, "solo_seconds": 1.0}, {"seconds": 1.9, "solo_seconds": 1.0}]
    assert contention(rows) == pytest.approx(2.0)
    assert contention([{"seconds": 0.9, "solo_seconds": 1.0}]) == 1.0 and contention([{"seconds": 1.0}]) == 1.0


def test_hsdp_shards_state_inside_the_node_and_all_reduces_across_replicas_by_hand():
    cfg = load_model_config("llama2-7b")
    h = hw(devices_per_node=8, compute_dtype="bf16")
    n = cfg.layer_params(0)
    # 64 dp ranks, shard groups of 8 (one node): ZeRO-3 traffic on NVLink + an all-reduce of n/8 over 8 replicas on IB
    want_ar = cm.allreduce_s(n / 8 * 2, 8, 10 * GB, 1e-4)
    assert cm.hsdp_allreduce_s(n, 64, 8, 1, h) == pytest.approx(want_ar)
    assert cm.hsdp_allreduce_s(n, 8, 8, 1, h) == 0.0  # one replica: plain FSDP
    full = cm.layer_costs(cfg, 0, LayerStrategy(dp=64, zero=3), 1, 4096, h)
    hsdp = cm.layer_costs(cfg, 0, LayerStrategy(dp=64, zero=3, dp_shard=8), 1, 4096, h)
    assert hsdp["params_bytes"] == pytest.approx(n * 2 / 8) and full["params_bytes"] == pytest.approx(n * 2 / 64)
    assert hsdp["optimizer_bytes"] == pytest.approx(n * 12 / 8)
    intra_z3 = 2 * cm.allgather_s(n * 2, 8, 100 * GB, 1e-5) + cm.reduce_scatter_s(n * 2, 8, 100 * GB, 1e-5)
    assert hsdp["dp_mb"] == pytest.approx(intra_z3 + want_ar)
    assert hsdp["dp_mb"] < full["dp_mb"]  # the point of HSDP: gathers stay on the fast links


def test_hsdp_plan_validation():
    from meshwright.errors import ConfigError

    LayerStrategy(dp=8, zero=3, dp_shard=4).validate()
    for bad in (dict(dp=8, zero=1, dp_shard=4), dict(dp=8, zero=3, dp_shard=3), dict(dp=8, zero=3, dp_shard=8),
                dict(dp=8, zero=2, dp_shard=1)):
        with pytest.raises(ConfigError, match="dp_shard"):
            LayerStrategy(**bad).validate()


def test_overhead_fits_prefer_the_collectives_timed_in_the_profile():
    """A profile taken on other links (fewer ranks, one node) carries its own collective timings: the overhead is
    what is left after those, not after the plan's link model, so it does not shrink when the plan's links are slower."""
    from meshwright.launcher.profiling.overhead import overhead_fits

    cfg = load_model_config("tiny")
    slow_links = hw(intra_bw=0.01 * GB, intra_lat=1e-3, devices_per_node=2, compute_dtype="fp32")
    e = {"kind": "dense", "layer_index": 0, "tp": 2, "sp": False, "zero": 0, "group_size": 2,
         "points": [{"tokens": t, "seq": 64, "plain_s": 1e-5 * t, "comm_s": 0.002, "runtime_s": 1e-5 * t + 0.002 + 0.015}
                    for t in (64, 128, 256, 512)]}
    (key, a, b), = overhead_fits({"runtime_overheads": [e]}, cfg, slow_links)
    assert key == "tp2" and a == pytest.approx(0.015, rel=1e-6) and b == pytest.approx(0.0, abs=1e-12)


# ---- what the runtime allocates: precision policies, copies, loss buffers, working set (issue 17) ----

def test_precision_policies_bytes_per_parameter_by_hand():
    n = 1e9
    auto = cm.model_state_bytes(n, 8, 0, "fp32", hw(precision="autocast"))
    assert auto == {"params": 4e9, "grads": 4e9, "optimizer": 8e9}  # fp32 params + grads, m and v; no master copy
    meg = cm.model_state_bytes(n, 8, 0, "fp32", hw(precision="bf16_fp32_grads"))
    assert sum(meg.values()) == pytest.approx(18e9)  # Megatron: 2 + 4 + 12
    meg1 = cm.model_state_bytes(n, 8, 1, "fp32", hw(precision="bf16_fp32_grads"))
    assert sum(meg1.values()) == pytest.approx(6e9 + 12e9 / 8)  # distributed optimizer: 6 + 12/d
    titan = cm.model_state_bytes(n, 8, 3, "fp32", hw(precision="fsdp_mixed"))
    assert sum(titan.values()) == pytest.approx(16e9 / 8)
    # fp32 compute keeps everything fp32 whatever the stack says
    assert hw(precision="bf16_fp32_grads", compute_dtype="fp32").policy.name == "fp32"
    assert cm.optimizer_state_bytes("fp32") == 8.0
    with pytest.raises(Exception, match="optimizer.name"):
        cm.optimizer_state_bytes("fp32", "lion")


def test_deepspeed_fp32_counts_the_zero_optimizers_master_copy_by_hand():
    """DeepSpeed 0.19.8 in fp32 (measured in tests/distributed/parity_deepspeed.py): ZeRO-0 runs the torch optimizer
    (4 + 4 + 8 B), the ZeRO-1/2/3 optimizers clone the rank's fp32 partition as a master copy (4/dp B more) even though
    the parameters are fp32; the other stacks' fp32 keeps no master copy."""
    from meshwright.launcher.planner.stack import precision_for_dtype

    n, dp = 1e9, 8
    ds = cm.apply_stack(hw(compute_dtype="fp32"), "deepspeed")
    assert ds.policy.name == "deepspeed_fp32" and precision_for_dtype("fp32", "deepspeed") == "deepspeed_fp32"
    got = {z: sum(cm.model_state_bytes(n, dp, z, "fp32", ds).values()) / n for z in range(4)}
    assert got == pytest.approx({0: 16.0, 1: 8 + 12 / dp, 2: 4 + 16 / dp, 3: 20 / dp})
    for stack in ("meshwright", "megatron", "torchtitan"):
        plain = cm.apply_stack(hw(compute_dtype="fp32"), stack)
        assert plain.policy.name == "fp32"
        assert sum(cm.model_state_bytes(n, dp, 1, "fp32", plain).values()) / n == pytest.approx(8 + 8 / dp)
    # in bf16 the stack keeps its bf16 policy (master copy at every stage)
    bf = cm.apply_stack(hw(compute_dtype="bf16"), "deepspeed")
    assert bf.policy.name == "bf16" and sum(cm.model_state_bytes(n, dp, 0, "fp32", bf).values()) / n == 16.0
    # a whole plan: the cluster's fp32 DeepSpeed hardware predicts the master copy (+ fragmentation) over plain fp32
    cfg = load_model_config("llama2-7b")
    dsh = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="deepspeed", dtype="fp32")
    for zero in range(4):
        plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                    layers=[LayerStrategy(dp=dp, zero=zero, recompute="full", repeat=cfg.n_layers)],
                    embedding=EmbeddingStrategy(zero=zero))
        validate_plan(plan, cfg, dp)
        mem = [max(cm.evaluate_plan(plan, cfg, h, dp).memory_gib) for h in (dsh, dataclasses.replace(dsh, precision="fp32"))]
        master = 0.0 if zero == 0 else cfg.num_params() * 4 / dp * (1 + dsh.fragmentation) / cm.GIB
        assert mem[0] - mem[1] == pytest.approx(master, abs=1e-6), zero


def test_deepspeed_pipeline_zero0_counts_bf16_optimizer_and_the_search_agrees():
    """bf16 ZeRO-0 under DeepSpeed's pipeline engine is BF16_Optimizer with bf16 accumulation (measured in
    tests/distributed/parity_deepspeed.py): bf16 parameters and gradients plus a bf16 accumulation buffer, fp32 master
    and Adam states sharded over dp, 6 + 12/dp B/param (18 at dp=1, more than ZeRO-0's 16). Without a pipeline, in
    fp32, at ZeRO-1, and on the other stacks nothing changes; evaluate_plan and the search count it alike."""
    from meshwright.launcher.planner.search import Constraints, search

    n = 1e9
    ds = cm.apply_stack(hw(), "deepspeed")
    piped = cm.for_pipeline(ds, 4)
    assert cm.for_pipeline(ds, 1) is ds and cm.for_pipeline(piped, 4) is piped
    per = lambda h, dp, z: sum(cm.model_state_bytes(n, dp, z, "fp32", h).values()) / n  # noqa: E731
    assert (per(piped, 8, 0), per(piped, 1, 0), per(ds, 8, 0)) == pytest.approx((6 + 12 / 8, 18.0, 16.0))
    assert per(piped, 8, 1) == per(ds, 8, 1) == pytest.approx(4 + 12 / 8)
    assert per(cm.for_pipeline(cm.apply_stack(hw(compute_dtype="fp32"), "deepspeed"), 4), 8, 0) == 16.0
    for stack in ("megatron", "deepspeed-fp32-accum"):
        h = cm.apply_stack(hw(), stack)
        assert cm.for_pipeline(h, 4) is h
    # meshwright's pp>1 layouts are costed apart for their reduction after backward only: the same model states
    mw = cm.apply_stack(hw(), "meshwright")
    assert all(per(cm.for_pipeline(mw, 4), 8, z) == per(mw, 8, z) for z in range(4))
    # torchtitan's pp>1 layouts are costed on their own too: the pipeline schedule defers its FSDP2 layers' reduction
    # to the step, accumulating unsharded fp32 gradients (4 B/param) meanwhile
    titan = cm.apply_stack(hw(), "torchtitan")
    assert cm.for_pipeline(titan, 4).pipelined
    assert (per(cm.for_pipeline(titan, 4), 8, 3), per(titan, 8, 3)) == pytest.approx((4 / 8 + 4 + 8 / 8, 2.0))
    # a whole pp=2 plan: every parameter's ZeRO-0 states (blocks, embedding and head) 16 -> 6 + 12/4 B (+ fragmentation)
    cfg = load_model_config("llama2-7b")
    dsh = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="deepspeed")
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                pipeline=PipelineSpec(degree=2, schedule="1f1b", microbatches=16),
                layers=[LayerStrategy(dp=4, recompute="full", repeat=cfg.n_layers)])
    validate_plan(plan, cfg, 8)
    new = cm.evaluate_plan(plan, cfg, dsh, 8)
    old = cm.evaluate_plan(plan, cfg, dataclasses.replace(dsh, pipeline_zero0_precision=""), 8)
    saved = sum(o - m for o, m in zip(old.memory_gib, new.memory_gib)) * cm.GIB
    assert saved == pytest.approx(cfg.num_params() * (16 - 6 - 12 / 4) * (1 + dsh.fragmentation), rel=1e-9)
    # the search's per-rank DPs count it too (pp>1 on its own Hardware and memos): in 60 GiB the room it leaves buys
    # less recomputation than the old count allowed
    tight = dataclasses.replace(dsh, memory_bytes=60 * cm.GIB)
    fixed = Constraints(pp=2, zero=0, tp=1, micro_batch=1, schedule="1f1b")
    res, was = (search(cfg, load_cluster("dgx-a100-80g"), 4096, 64, hw=h, constraints=fixed).best
                for h in (tight, dataclasses.replace(tight, pipeline_zero0_precision="")))
    assert res.prediction.memory_gib == pytest.approx(cm.evaluate_plan(res.plan, cfg, tight, 8).memory_gib)
    assert res.prediction.fits and res.prediction.step_s < 0.9 * was.prediction.step_s


def test_autocast_weight_copies_and_zero3_gather_by_hand():
    cfg = load_model_config("llama2-7b")
    n = cfg.layer_params(0)
    h = hw(precision="autocast", runtime_buffers=True)
    c = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=0), 1, 4096, h)
    assert c["copy_bytes"] == pytest.approx(2 * n)  # one bf16 copy of each weight, not sharded over dp
    assert c["static_bytes"] == pytest.approx(n * (4 + 4 + 8) + 2 * n)
    z3 = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, h)
    # meshwright's ZeRO-3 layers are FSDP2 modules with MixedPrecisionPolicy(bf16): the gathered layer, the prefetched
    # one and the unsharded gradient are bf16, and autocast caches no copy of weights that arrive in bf16
    assert z3["gathered_bytes"] == pytest.approx(3 * 2 * n) and z3["copy_bytes"] == 0.0
    titan = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, hw(precision="fsdp_mixed", runtime_buffers=True))
    assert titan["gathered_bytes"] == pytest.approx(3 * 2 * n) and titan["copy_bytes"] == 0.0  # gathered in bf16
    plain = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, hw())
    assert plain["gathered_bytes"] == pytest.approx(2 * 2 * n) and plain["transient_bytes"] == plain["gathered_bytes"]



def test_deepspeed_zero3_counts_one_bucket_and_its_live_parameter_budget():
    """DeepSpeed's buffers as its ZeRO stages hold them (runtime/zero/stage3.py; measured in
    tests/distributed/parity_deepspeed.py): no reduction bucket at ZeRO-0, two at ZeRO-1/2, one at ZeRO-3, and at ZeRO-3
    all-gathered parameters up to the larger of stage3_max_live_parameters and stage3_max_reuse_distance (the whole
    model at most), plus the layer's unsharded gradient."""
    from meshwright.launcher.planner.stack import STACKS, DeepSpeedSizes

    cfg = load_model_config("llama2-7b")
    n = cfg.layer_params(0)
    h = cm.apply_stack(hw(), "deepspeed")
    assert (h.stack_buffers, h.stack_buffer_bytes) == ((0.0, 2e9, 2e9, 1e9), 0.0)
    z0, z1, z3 = (cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=z), 1, 4096, h) for z in (0, 1, 3))
    assert z0["gathered_bytes"] == 0.0
    assert z1["gathered_bytes"] == pytest.approx(2e9)  # the buckets, once per rank (a maximum over its layers)
    assert z3["gathered_bytes"] == pytest.approx(1e9 + 2 * (1e9 + n))
    # the budget is the larger of the two sizes, and never more than the model (scaled by the layer's tp sharding)
    st = dataclasses.replace(STACKS["deepspeed"], deepspeed=DeepSpeedSizes(stage3_max_live_parameters=10**8,
                                                                           stage3_max_reuse_distance=3 * 10**8))
    assert cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, cm.apply_stack(hw(), st))["gathered_bytes"] \
        == pytest.approx(1e9 + 2 * (3e8 + n))
    tiny = load_model_config("tiny")
    t2 = cm.layer_costs(tiny, 0, LayerStrategy(tp=2, dp=4, zero=3), 1, 128, h)
    # the tp2 shard holds the block's norms whole (``dense_params_on_rank``): the model on the rank scales with it
    shard = cm.dense_params_on_rank(tiny, 0, 2)
    assert t2["gathered_bytes"] == pytest.approx(1e9 + 2 * (tiny.num_params() * shard / tiny.layer_params(0) + shard))
    # the stacks without a budget keep the layer + prefetch + gradient count, and no buckets
    fp32_accum = cm.apply_stack(hw(), "deepspeed-fp32-accum")
    assert (fp32_accum.stack_buffer_bytes, fp32_accum.zero3_live_params) == (0.0, 1e9)
    titan = cm.layer_costs(cfg, 0, LayerStrategy(dp=8, zero=3), 1, 4096, cm.apply_stack(hw(), "torchtitan"))
    assert titan["gathered_bytes"] == pytest.approx(3 * 2 * n)


def test_loss_buffers_and_backward_working_set_by_hand():
    cfg = load_model_config("llama2-7b")
    V, h_, f_ = cfg.vocab_size, cfg.d_model, cfg.ffn_dim
    assert cm.loss_buffer_bytes(cfg, 4096, 2) == 4096 * V / 2 * 8  # fp32 log-probs + fp32 logit gradient
    # full recompute rebuilds the whole block (6h + 4h + 4f per token) minus its kept input (h), + 2f of gradients
    full = cm.backward_working_bytes(cfg, 0, 4096, 1, False, "full", 2)
    assert full == pytest.approx(4096 * 2 * ((10 * h_ + 4 * f_ - h_) + 2 * f_))
    none = cm.backward_working_bytes(cfg, 0, 4096, 1, False, "none", 2)
    assert none == pytest.approx(4096 * 2 * 2 * f_)
    sel = cm.backward_working_bytes(cfg, 0, 4096, 2, True, "selective", 2)
    assert sel == pytest.approx(4096 * 2 * (4 * h_ / 2 + 2 * f_ / 2))  # the attention core's 4h/tp again


def test_single_device_memory_with_runtime_buffers_by_hand():
    cfg = load_model_config("tiny")
    h = hw(precision="autocast", runtime_buffers=True, overhead_bytes=100.0, fragmentation=0.1)
    plan = Plan(model="tiny", seq_len=128, global_batch=4, micro_batch=2, layers=[LayerStrategy(repeat=cfg.n_layers)])
    p = cm.evaluate_plan(plan, cfg, h, 1)
    t = 2 * 128
    states = cfg.num_params() * 16 + 2 * (cfg.n_layers * cfg.layer_params(0) + cfg.vocab_size * cfg.d_model)
    acts = cfg.n_layers * (cm.activation_bytes(cfg, 0, t, 1, False, "none", 2) + cm.autocast_extra_act_bytes(cfg, t, 1, False, "none"))
    ends = cm.logits_bytes(cfg, t, 1, 2) + cm.loss_buffer_bytes(cfg, t, 1)
    work = cm.backward_working_bytes(cfg, 0, t, 1, False, "none", 2)
    used = states + acts + ends + work
    assert p.memory_gib[0] * cm.GIB == pytest.approx(used + 100.0 + 0.1 * used)


def test_stack_rules_change_dp_reduction_overlap_and_pipeline_time():
    cfg = load_model_config("llama2-7b")
    n = 1e9
    meg = cm.apply_stack(hw(), "megatron")
    assert cm.dp_comm_s(n, 8, 0, 1, meg)[1] == pytest.approx(cm.allreduce_s(n * 4, 8, 100 * GB, 1e-5))  # fp32 grads
    c = cm.layer_costs(cfg, 0, LayerStrategy(dp=8), 1, 4096, meg)
    assert cm.layer_step_dp_s(c, meg) == pytest.approx(c["dp_step"])  # reduced after backward, not overlapped
    titan = cm.apply_stack(hw(), "torchtitan")
    ct = cm.layer_costs(cfg, 0, LayerStrategy(dp=8), 1, 4096, titan)
    assert cm.layer_step_dp_s(ct, titan) < ct["dp_step"]
    # Megatron hides the backward TP collectives under the weight-gradient matmuls
    s = LayerStrategy(tp=8, sp=True, dp=1)
    plain, ov = cm.layer_costs(cfg, 0, s, 1, 4096, hw()), cm.layer_costs(cfg, 0, s, 1, 4096, hw(tp_wgrad_overlap=True))
    assert ov["comm_mb"] == pytest.approx(plain["comm_mb"] / 2 + max(0.0, plain["comm_mb"] / 2 - cm.compute_s(
        cm.layer_fwd_flops(cfg, 0, 4096, 4096) / 8, hw(), 1.0)))
    # DeepSpeed's pipeline engine is slower on the same pipelined layout
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                pipeline=PipelineSpec(degree=2, schedule="1f1b", microbatches=16),
                layers=[LayerStrategy(tp=1, dp=4, repeat=32)])
    ds = cm.apply_stack(hw(), "deepspeed")
    d = cm.evaluate_plan(plan, cfg, ds, 8)
    same = cm.evaluate_plan(plan, cfg, dataclasses.replace(ds, pipeline_slowdown=1.0), 8)
    assert d.step_s == pytest.approx(1.25 * same.step_s, rel=0.02)  # all but the small exposed DP tail
    with pytest.raises(Exception, match="stack"):
        cm.apply_stack(hw(), "jax")


def test_backward_is_twice_forward_for_matmuls_only():
    cfg = load_model_config("llama2-7b")
    h = hw(mem_bw=1e12)
    c = cm.layer_costs(cfg, 0, LayerStrategy(), 1, 4096, h)
    mm = cm.compute_s(cm.layer_fwd_flops(cfg, 0, 4096, 4096), h, cfg.d_model)
    ew = cm.elementwise_s(cfg, 0, 4096, 1, False, h)
    assert c["compute_mb"] == pytest.approx(3 * mm + 2 * ew)


def test_autocast_activation_extra_matches_saved_bytes_of_a_block():
    """Under bf16 autocast a block saves fp32 norm/residual tensors next to the bf16 casts: the planner's
    AUTOCAST_EXTRA_H, checked on the tiny block with the profiler's slope measurement (weight copies excluded)."""
    from meshwright.launcher.profiling.blocks import shard_block
    from meshwright.launcher.profiling.model import saved_bytes_per_token

    cfg = load_model_config("tiny")
    torch.manual_seed(0)
    block = shard_block(cfg, 0, 1)
    measured = saved_bytes_per_token(block, cfg, 1, 64, torch.device("cpu"), "bf16")
    want = cm.activation_bytes(cfg, 0, 1.0, 1, False, "none", 2) + cm.autocast_extra_act_bytes(cfg, 1.0, 1, False, "none")
    assert measured == pytest.approx(want, rel=0.15)
    h = hw(precision="autocast")
    c = cm.layer_costs(cfg, 0, LayerStrategy(), 1, 64, h)
    assert c["act_bytes"] == pytest.approx(64 * want)


def test_cluster_memory_bandwidth_and_clock_fraction_change_the_hardware():
    """An H100 with slower HBM and a power-capped clock: the cluster spec says so and the cost model follows."""
    cl = load_cluster("dgx-h100-80g")
    base = cm.hardware_from_cluster(cl)
    slow = cm.hardware_from_cluster(dataclasses.replace(cl, memory_bw_gbps=2400.0, clock_fraction=0.8))
    assert slow.mem_bw == pytest.approx(0.8 * 2400e9) and base.mem_bw == pytest.approx(0.8 * 3.35e12)
    assert slow.peak_flops == pytest.approx(0.8 * base.peak_flops)
    with pytest.raises(Exception, match="clock_fraction"):
        dataclasses.replace(cl, clock_fraction=1.5).validate()


def test_fsdp2_zero2_stores_sharded_params_and_keeps_the_gathered_weights():
    """meshwright's ZeRO-2 is FSDP2 with reshard_after_forward=False (and torchtitan's export writes "never"): the
    stored fp32 parameters are sharded over dp and the all-gathered weights (bf16 under MixedPrecisionPolicy, fp32
    without one) stay alive through the step. Measured at dp=2 and 4 (tests/distributed/state_bytes_worker.py):
    bf16 2 + 16/dp B/param, fp32 4 + 16/dp; planned 4(1 - 1/dp) more in bf16 and 4/dp less in fp32 before stop 33.
    DeepSpeed's ZeRO-2 keeps whole parameters, the analytic default too."""
    n = 1e9
    per = lambda h, dp, z: (sum(cm.model_state_bytes(n, dp, z, "fp32", h).values())  # noqa: E731
                            + n * cm.gathered_weight_bytes(z, h)) / n
    for stack in ("meshwright", "torchtitan"):
        for dtype, gathered in (("bf16", 2), ("fp32", 4)):
            h = cm.apply_stack(hw(compute_dtype=dtype), stack)
            for dp in (2, 4, 8):
                assert per(h, dp, 2) == pytest.approx(gathered + 16 / dp), (stack, dtype, dp)
                assert cm.weight_copy_bytes(2, h) == gathered
                assert per(h, dp, 3) == pytest.approx(16 / dp)  # ZeRO-3's gathered layer is a transient
            assert cm.model_state_bytes(n, 8, 1, "fp32", h)["params"] == 4 * n  # ZeRO-1: whole (DDP)
    ds = cm.apply_stack(hw(), "deepspeed")
    assert cm.model_state_bytes(n, 8, 2, "fp32", ds)["params"] == 2 * n and cm.gathered_weight_bytes(2, ds) == 0
    assert cm.model_state_bytes(n, 8, 2, "fp32", hw())["params"] == 2 * n
    # a whole plan: the meshwright ZeRO-2 prediction drops by 4(1 - 1/dp) B/param (+ fragmentation) in bf16
    cfg = load_model_config("llama2-7b")
    mw = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright")
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                layers=[LayerStrategy(dp=8, zero=2, recompute="full", repeat=cfg.n_layers)],
                embedding=EmbeddingStrategy(zero=2))
    validate_plan(plan, cfg, 8)
    new = cm.evaluate_plan(plan, cfg, mw, 8).memory_gib[0]
    old = cm.evaluate_plan(plan, cfg, dataclasses.replace(mw, fsdp_zero2=False), 8).memory_gib[0]
    assert (old - new) * cm.GIB == pytest.approx(cfg.num_params() * 4 * (1 - 1 / 8) * (1 + mw.fragmentation), rel=1e-6)


def _llama7b_pp2_dp4_zero1(cfg) -> Plan:
    """Llama-2-7B on 8 devices as DeepSpeed's pipeline engine runs it: pp2 1F1B (16 microbatches) x dp4 ZeRO-1."""
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                pipeline=PipelineSpec(degree=2, schedule="1f1b", microbatches=16),
                layers=[LayerStrategy(dp=4, zero=1, recompute="full", repeat=cfg.n_layers)],
                embedding=EmbeddingStrategy(zero=1))
    validate_plan(plan, cfg, 8)
    return plan


def test_deepspeed_pipeline_engine_reduces_after_the_schedule():
    """DeepSpeed's pipeline engine (pp>1) reduces data-parallel gradients in ReduceGrads, after the last BackwardPass
    of the schedule (pipe/schedule.py TrainSchedule; engine.py turns ZeRO-1/2's overlap_comm off for a
    PipelineModule): the reduction is exposed at every ZeRO stage, where without a pipeline ZeRO-1 overlaps it with
    the last backward. A pp>1 plan's step grows by the whole reduction; the other stacks and pp=1 keep their overlap."""
    ds = cm.apply_stack(hw(), "deepspeed")
    piped = cm.for_pipeline(ds, 4)
    assert ds.dp_overlapped(1) and not piped.dp_overlapped(1) and not piped.dp_overlapped(0)
    for stack in ("megatron", "deepspeed-fp32-accum"):  # meshwright's own: the test below
        h = cm.apply_stack(hw(), stack)
        assert cm.for_pipeline(h, 4).dp_overlapped(1) == h.dp_overlapped(1)
    assert not cm.apply_stack(hw(), "deepspeed-fp32-accum").dp_overlapped(1)  # BF16_Optimizer: after backward anyway
    cfg = load_model_config("llama2-7b")
    dsh = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="deepspeed")
    plan = _llama7b_pp2_dp4_zero1(cfg)
    new = cm.evaluate_plan(plan, cfg, dsh, 8)
    old = cm.evaluate_plan(plan, cfg, dataclasses.replace(dsh, pipeline_reduces_after_schedule=False), 8)
    # the stage's whole reduction uncovered: an all-reduce of its bf16 gradients over dp=4 (intra-node), of which
    # only the overlap slowdown was charged before
    stage = cfg.num_params() / 2
    ar = cm.allreduce_s(stage * 2, 4, dsh.intra_bw, dsh.intra_lat)
    assert new.step_s - old.step_s == pytest.approx((1 - dsh.overlap_slowdown) * ar, rel=0.05)
    assert new.memory_gib == old.memory_gib


def test_meshwright_reduces_after_backward_where_no_ddp_wraps_the_stage():
    """meshwright's runtime (parallel/runtime.py) wraps a stage in DDP, whose bucket hooks overlap the all-reduce with
    backward, only on uniform layouts (pp=1, tp=1, one ZeRO-0/1 stage, no ep). ZeRO-0/1 layers of a pp>1 plan, of
    tp>1 (DTensor) or of ep>1 are summed by ``_finish_grads``' bucketed all-reduce after the last backward: exposed.
    FSDP2 layers (ZeRO-2/3) reduce-scatter from their backward hooks at any pp: overlapped."""
    mw = cm.apply_stack(hw(), "meshwright")
    piped = cm.for_pipeline(mw, 4)
    assert piped.pipelined and not cm.for_pipeline(mw, 1).pipelined
    assert mw.dp_overlapped(0) and mw.dp_overlapped(1)  # DDP
    assert not piped.dp_overlapped(0) and not piped.dp_overlapped(1)  # pipelined: after the schedule
    assert piped.dp_overlapped(2) and piped.dp_overlapped(3) and mw.dp_overlapped(2, tp=2)  # FSDP2
    assert not mw.dp_overlapped(0, tp=2) and not mw.dp_overlapped(0, ep=4)  # manual all-reduce at pp=1 too
    # nothing else a pipeline changes for meshwright: the same model states and FSDP2 sync
    assert piped.policy_at(0) == mw.policy_at(0) and not piped.fsdp_deferred(2)
    cfg = load_model_config("llama2-7b")
    mwh = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright")
    ddp_like = dataclasses.replace(mwh, reduces_after_backward_zero=())  # the cost before: overlapped as DDP's
    plan = Plan(model="llama2-7b", seq_len=4096, global_batch=64, micro_batch=1,
                pipeline=PipelineSpec(degree=2, schedule="1f1b", microbatches=16),
                layers=[LayerStrategy(dp=4, zero=0, recompute="full", repeat=cfg.n_layers)],
                embedding=EmbeddingStrategy(zero=0))
    validate_plan(plan, cfg, 8)
    new, old = cm.evaluate_plan(plan, cfg, mwh, 8), cm.evaluate_plan(plan, cfg, ddp_like, 8)
    # the stage's fp32 gradients all-reduced over dp=4 (intra-node), uncovered but for the overlap slowdown
    # charged before
    stage = cfg.num_params() / 2
    ar = cm.allreduce_s(stage * 4, 4, mwh.intra_bw, mwh.intra_lat)
    assert new.step_s - old.step_s == pytest.approx((1 - mwh.overlap_slowdown) * ar, rel=0.05)
    assert new.memory_gib == old.memory_gib
    # a tp>1 plan without a pipeline: its layers' all-reduce (over dp=4 of the tp=2 gradients) exposed as well
    tp = dataclasses.replace(plan, pipeline=PipelineSpec(), layers=[LayerStrategy(dp=4, tp=2, zero=0, recompute="full",
                                                                                  repeat=cfg.n_layers)])
    validate_plan(tp, cfg, 8)
    gap = cm.evaluate_plan(tp, cfg, mwh, 8).step_s - cm.evaluate_plan(tp, cfg, ddp_like, 8).step_s
    layers = sum(cfg.layer_params(i) for i in range(cfg.n_layers)) / 2
    assert gap == pytest.approx((1 - mwh.overlap_slowdown) * cm.allreduce_s(layers * 4, 4, mwh.intra_bw, mwh.intra_lat),
                                rel=0.05)
    # ZeRO-3 layers (FSDP2) and a uniform DDP plan keep their cost
    for p in (dataclasses.replace(plan, layers=[LayerStrategy(dp=4, zero=3, recompute="full", repeat=cfg.n_layers)],
                                  embedding=EmbeddingStrategy(zero=3)),
              dataclasses.replace(plan, pipeline=PipelineSpec(),
                                  layers=[LayerStrategy(dp=8, zero=0, recompute="full", repeat=cfg.n_layers)])):
        validate_plan(p, cfg, 8)
        assert cm.evaluate_plan(p, cfg, mwh, 8).step_s == cm.evaluate_plan(p, cfg, ddp_like, 8).step_s


def test_bf16_optimizer_passes_charged_per_microbatch_and_per_step(monkeypatch):
    """DeepSpeed's BF16_Optimizer (runtime/bf16_optimizer.py, immediate_grad_update off) zeroes the bf16 gradients
    and adds them into its accumulation buffer after every microbatch (update_hp_grads: the .to() cast of an fp32
    buffer makes a temporary), and per step copies the whole buffer through the reduction's flat bucket (cast to bf16
    and back for an fp32 buffer), reads it for the norm, scales it for clipping, zeroes it, and casts/copies the dp
    partition for the fp32 step and the bf16 weights. By hand, bytes per parameter (dp=8): fp32 buffer (BLOOM's
    deepspeed-fp32-accum) 2 + 2 + 8 + 8 = 20 per microbatch, 28 + 4 + 8 + 4 + 6/8 per step; bf16 buffer (the
    pipeline engine's ZeRO-0) 8 per microbatch, 8 + 2 + 4 + 2 + 12/8 per step. Other optimizers: nothing new."""
    n, dp = 1e9, 8
    accum = cm.for_pipeline(cm.apply_stack(hw(mem_bw=1e12), "deepspeed-fp32-accum"), 4)
    piped = cm.for_pipeline(cm.apply_stack(hw(mem_bw=1e12), "deepspeed"), 4)
    mb, step = cm.grad_accumulation_s(n, dp, 1, accum)
    assert (mb * accum.mem_bw / n, step * accum.mem_bw / n) == pytest.approx((20.0, 20 + 44 + 6 / dp))
    mb, step = cm.grad_accumulation_s(n, dp, 0, piped)
    assert (mb * piped.mem_bw / n, step * piped.mem_bw / n) == pytest.approx((8.0, 8 + 16 + 12 / dp))
    assert cm.grad_accumulation_s(n, dp, 1, piped) == (0.0, 0.0)  # DeepSpeedZeroOptimizer: not this optimizer
    assert cm.grad_accumulation_s(n, dp, 1, cm.apply_stack(hw(), "megatron")) == (0.0, 0.0)
    # a whole plan: every rank's step grows by its parameters' passes (m microbatches), blocks and both ends
    cfg = load_model_config("llama2-7b")
    dsh = cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="deepspeed-fp32-accum")
    plan = _llama7b_pp2_dp4_zero1(cfg)
    base = cm.evaluate_plan(plan, cfg, dsh, 8)
    monkeypatch.setattr(cm, "bf16_optimizer_passes_s", lambda *a: (0.0, 0.0))
    without = cm.evaluate_plan(plan, cfg, dsh, 8)
    # the slower stage's parameters (its blocks and one end; llama2-7b's untied embedding and head are alike)
    stage = (sum(cfg.layer_params(i) for i in range(cfg.n_layers // 2))
             + cm.embedding_param_count(cfg, False, True, 1))
    extra = stage * (16 * 20 + 44 + 6 / 4) / dsh.mem_bw
    assert base.step_s - without.step_s == pytest.approx(extra, rel=0.02)


def test_manual_all_reduce_flat_copy_is_in_the_peak_when_activations_are_small():
    """A layer-wise plan (ZeRO-0 blocks beside ZeRO-2 ones, replicated ends) is not one DDP module: after the last
    backward meshwright's runtime all-reduces each ZeRO-0 block and the ends through a flat copy of the group's
    gradients (data_parallel.all_reduce_grad_groups, one buffer of the largest group's size; measured in
    tests/distributed/state_bytes_worker.py). With a large vocabulary and few tokens that copy (the ends' fp32
    gradients) is above the backward peak's activations: the rank's memory is at least its states plus it."""
    cfg = load_model_config({"name": "wide-vocab", "arch": "llama", "vocab_size": 65536, "d_model": 512, "n_layers": 2,
                             "n_heads": 8, "ffn_hidden": 1024, "max_seq_len": 64})
    hw = cm.apply_stack(cm.hardware_from_cluster(load_cluster("dgx-a100-80g"), stack="meshwright", dtype="fp32"),
                        "meshwright")
    plan = Plan(model="wide-vocab", cluster={}, seq_len=16, global_batch=2, micro_batch=1,
                layers=[LayerStrategy(dp=2, zero=0), LayerStrategy(dp=2, zero=2)],
                embedding=EmbeddingStrategy(zero=0))
    manual = cm.for_reduction(hw, plan)
    assert manual.manual_dp and manual.reduces_after_backward(0) and not manual.reduces_after_backward(2)
    # the groups: block 0 (ZeRO-0) whole, block 1 (FSDP2) none, the ends (embedding, final norm, head) one group
    assert cm.reduce_copy_bytes(cfg, 0, plan.layers[0], manual) == 4 * cfg.layer_params(0)
    assert cm.reduce_copy_bytes(cfg, 1, plan.layers[1], manual) == 0.0
    assert cm.reduce_copy_bytes(cfg, 0, LayerStrategy(dp=1, zero=0), manual) == 0.0  # no dp group: nothing reduced
    assert cm.reduce_copy_bytes(cfg, 0, plan.layers[0], hw) == 0.0  # one DDP module: its buckets are the gradients
    ends = 4 * cm.embedding_param_count(cfg, True, True, 1)
    pred = cm.evaluate_plan(plan, cfg, hw, 2)
    states = (pred.breakdown["mem_states_gib"] + pred.breakdown["mem_weight_copies_gib"]) * cm.GIB
    backward = states + (pred.breakdown["mem_activations_gib"] + pred.breakdown["mem_transient_gib"]
                         + pred.breakdown["mem_loss_gib"]) * cm.GIB
    assert backward < states + ends  # the case: the copy after backward is the peak
    used = (pred.memory_gib[0] - pred.breakdown["mem_overhead_gib"]) * cm.GIB  # before the framework's overhead
    assert used == pytest.approx(states + ends, rel=1e-12)
