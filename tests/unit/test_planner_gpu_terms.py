"""Step-time terms of meshwright's runtime on a GPU (issue 17): optimizer step, autocast weight traffic, gradient
accumulation, the loss's passes, flash attention and unaligned (eager) heads, each by hand from its docstring."""

from __future__ import annotations

import dataclasses

import pytest

from meshwright.config import load_cluster, load_model_config
from meshwright.launcher.planner import cost_model as cm
from meshwright.plan import LayerStrategy, Plan


def _h200(**kw):
    return cm.hardware_from_cluster(load_cluster("dgx-h200-141g", nodes=1, devices_per_node=1), **kw)


def test_memory_bound_step_terms_by_hand():
    hw = _h200()
    assert hw.mem_bw == pytest.approx(0.8 * 4.8e12) and hw.flash_eff_max == cm.FLASH_EFF_HOPPER
    n = 1e9
    # fused AdamW over fp32 weights, grads, m, v (+ a clip-norm read of the grads): 32 B per parameter
    assert cm.optimizer_step_s(n, 1, 0, "fp32", hw) == pytest.approx(n * 32 / hw.mem_bw)
    assert cm.optimizer_step_s(n, 4, 1, "fp32", hw) == pytest.approx(n * 32 / 4 / hw.mem_bw)  # ZeRO-1 shard
    assert cm.optimizer_step_s(n, 1, 0, "fp32", cm.apply_stack(hw, "megatron")) == 0.0  # left to its calibration
    # autocast: weight cast (6 B) + gradient up-cast (6 B) per microbatch, the weight cast again when recomputing
    assert cm.weight_traffic_mb_s(n, "none", hw) == pytest.approx(n * 12 / hw.mem_bw)
    assert cm.weight_traffic_mb_s(n, "full", hw) == pytest.approx(n * 18 / hw.mem_bw)
    assert cm.weight_traffic_mb_s(n, "none", cm.apply_stack(hw, "megatron")) == 0.0  # bf16 weights: no cast
    assert cm.grad_accumulate_s(n, hw) == pytest.approx(n * 12 / hw.mem_bw)
    cfg = load_model_config("gpt2-small")
    assert cm.loss_s(cfg, 1000, 1, _h200(compile=True)) == pytest.approx(1000 * cfg.vocab_size * 6 / hw.mem_bw)
    assert cm.loss_s(cfg, 1000, 1, hw) == pytest.approx(1000 * cfg.vocab_size * cm.EAGER_LOSS_BYTES / hw.mem_bw)


def test_flash_attention_and_unaligned_head():
    hw = _h200()
    cfg = load_model_config("gpt2-small")  # head_dim 64
    t = 16 * 1024
    eff = cm.FLASH_EFF_HOPPER * 64 / 128 * 1024 / 1536
    assert cm.flash_attention_fwd_s(cfg, t, 1024, 1, hw) == pytest.approx(
        0.5 * cm.attention_core_fwd_flops(cfg, t, 1024, 1) / (hw.peak_flops * eff))
    # the layer's compute: 3x its linear matmuls, 3.5x the flash core, 2x the memory-bound passes, the weight traffic
    c = cm.layer_costs(cfg, 0, LayerStrategy(), 16, 1024, hw)
    lin = cm.compute_s(2 * cfg.layer_params(0) * t, hw, cfg.d_model)
    want = (3 * lin + 3.5 * cm.flash_attention_fwd_s(cfg, t, 1024, 1, hw) + 2 * cm.elementwise_s(cfg, 0, t, 1, False, hw)
            + cm.weight_traffic_mb_s(cfg.layer_params(0), "none", hw))
    assert c["compute_mb"] == pytest.approx(want)
    # meshwright's selective recomputation reruns the memory-bound ops (and the weight casts), not the matmuls
    sel = cm.layer_costs(cfg, 0, LayerStrategy(recompute="selective"), 16, 1024, hw)
    assert sel["compute_mb"] - c["compute_mb"] == pytest.approx(
        cm.elementwise_s(cfg, 0, t, 1, False, hw) + cfg.layer_params(0) * 6 / hw.mem_bw)
    # the analytic model keeps the dense count (tests/unit/test_cost_model.py), and fp32 runs have no FA2
    assert not cm.flash_kernels(dataclasses.replace(hw, stack="analytic"))
    assert not cm.flash_kernels(_h200(dtype="fp32"))
    # gpt2's 50257-entry head breaks 16-byte alignment: half speed; padded to 50304 it runs at the dense rate
    padded = dataclasses.replace(cfg, vocab_size=50304)
    dense = cm.compute_s(3 * 2 * cfg.vocab_size * cfg.d_model * t, hw, cfg.d_model)
    assert cm.head_s(cfg, t, 1, hw) == pytest.approx(dense / cm.UNALIGNED_GEMM_EFFICIENCY)
    assert cm.head_s(padded, t, 1, hw) == pytest.approx(dense * 50304 / 50257)
    # compiled, the head runs in the loss's graph, where inductor pads the GEMM: the dense rate
    assert cm.head_s(cfg, t, 1, _h200(compile=True)) == pytest.approx(dense)


def test_accumulation_is_paid_by_every_microbatch_after_the_first():
    cfg = load_model_config("gpt2-small")
    hw = _h200(compile=True)

    def step(gb):
        plan = Plan(model="gpt2-small", seq_len=1024, global_batch=gb, micro_batch=8, layers=[LayerStrategy(repeat=12)])
        return cm.evaluate_plan(plan, cfg, hw, 1).step_s

    one, two, three = step(8), step(16), step(24)
    per_mb = two - one
    assert three - two == pytest.approx(per_mb)
    assert per_mb - (one - cm.optimizer_step_s(cfg.num_params(), 1, 0, "fp32", hw)) == pytest.approx(
        cm.grad_accumulate_s(cfg.num_params(), hw), rel=1e-6)
