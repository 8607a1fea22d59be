"""FLOPs conventions against hand-derived numbers (derivations in the comments), MFU/HFU arithmetic."""

import pytest

from meshwright.config import load_model_config
from meshwright.errors import ConfigError
from meshwright.tools.flops import (
    hardware_flops_per_token, model_flops_per_token, palm_flops_per_token, tflops_per_device, utilization,
)

# GPT-2 small, T=1024. PaLM: N = 12 layers x 7,087,872 + final LN 1,536 + head 50257x768 = 123,653,376;
# 6N = 741,920,256; 12*L*H*Q*T = 12*12*12*64*1024 = 113,246,208; sum 855,166,464.
# Megatron: 12*l*h^2 * (2 + s/(2h) + 4 + V/(2lh)) = 84,934,656 * 9.39336... = 797,815,296.
# Megatron 2021: 72*l*h^2 * (1 + s/(6h) + V/(12lh)) = 854,438,400.
GPT2 = {"palm": 855_166_464, "megatron": 797_815_296, "megatron2021": 854_438_400}
# Llama-2-7B, T=4096. PaLM: N = 32 x 202,383,360 + 4,096 + 32000x4096 = 6,607,343,616 -> 6N = 39,644,061,696,
# + 12*32*32*128*4096 = 6,442,450,944 -> 46,086,512,640. Megatron with SwiGLU (3/2 x 11008/4096) -> 42,863,689,728.
LLAMA = {"palm": 46_086_512_640, "megatron": 42_863_689_728, "megatron2021": 45_883_588_608}


@pytest.mark.parametrize("convention", ["palm", "megatron", "megatron2021"])
def test_conventions_match_hand_values(convention):
    assert model_flops_per_token(load_model_config("gpt2-small"), 1024, convention) == pytest.approx(GPT2[convention], rel=1e-12)
    assert model_flops_per_token(load_model_config("llama2-7b"), 4096, convention) == pytest.approx(LLAMA[convention], rel=1e-12)


def test_moe_counts_only_active_experts():
    cfg = load_model_config("mixtral-8x7b")
    dense_equiv = cfg.num_params(non_embedding=True, active_only=True)
    total = cfg.num_params(non_embedding=True)
    assert total > 3 * dense_equiv  # 8 experts stored, 2 used
    # FLOPs use the active experts only: doubling n_experts adds just the router's 8 extra columns
    # (6 x 32 layers x 4096 x 8 under PaLM counting; Megatron's formula ignores the router).
    import dataclasses

    more = dataclasses.replace(cfg, n_experts=16)
    assert model_flops_per_token(more, 4096, "palm") - model_flops_per_token(cfg, 4096, "palm") == 6 * 32 * 4096 * 8
    assert model_flops_per_token(more, 4096, "megatron") == model_flops_per_token(cfg, 4096, "megatron")
    top1 = dataclasses.replace(cfg, top_k=1)
    assert model_flops_per_token(top1, 4096) < model_flops_per_token(cfg, 4096)


def test_hfu_adds_recomputed_forward():
    cfg = load_model_config("gpt2-small")
    model = model_flops_per_token(cfg, 1024)
    full = hardware_flops_per_token(cfg, 1024, "full")
    sel = hardware_flops_per_token(cfg, 1024, "selective")
    # full recompute repeats the layers' forward: 2 x 85,054,464 params + 4*12*12*64*1024 attention
    assert full - model == pytest.approx(2 * 85_054_464 + 4 * 12 * 12 * 64 * 1024)
    assert sel - model == pytest.approx(4 * 12 * 12 * 64 * 1024)
    assert hardware_flops_per_token(cfg, 1024, "none") == model
    per_layer = hardware_flops_per_token(cfg, 1024, ["full"] * 6 + ["none"] * 6)
    assert per_layer - model == pytest.approx((full - model) / 2)


def test_mfu_arithmetic():
    # 1000 tokens/s x 1e9 FLOPs/token on 2 devices of 1 TFLOP/s peak = 50% MFU, 0.5 TFLOP/s per device
    assert utilization(1000, 1e9, 1e12, 2) == pytest.approx(0.5)
    assert tflops_per_device(1000, 1e9, 2) == pytest.approx(0.5)
    with pytest.raises(ConfigError, match="peak_flops_per_device"):
        utilization(1, 1, 0, 1)


def test_unknown_convention_is_one_line_error():
    with pytest.raises(ConfigError, match="flops_convention='foo' is invalid; valid: palm, megatron, megatron2021"):
        model_flops_per_token(load_model_config("tiny"), 128, "foo")


@pytest.mark.parametrize("preset", ["qwen3-0.6b", "qwen3-8b", "llama3-8b"])
def test_per_layer_flops_add_up_to_the_palm_count(preset):
    """The cost model's per-layer forward FLOPs (x3 for forward + backward), the head and the final norm add up to
    PaLM's 6N + 12·L·H·Q·T, also when head_dim is set apart from d_model/n_heads (Qwen3-0.6B: 16 heads of 128 on
    d_model 1024; the attention matmuls were counted d_model wide, half) and with Qwen3's q/k head norms in N."""
    from meshwright.tools.flops import head_fwd_flops, layer_fwd_flops

    cfg = load_model_config(preset)
    seq = 4096
    layers = sum(layer_fwd_flops(cfg, i, 1.0, seq) for i in range(cfg.n_layers))
    total = 3 * (layers + head_fwd_flops(cfg, 1.0)) + 6 * cfg.norm_params()
    assert total == pytest.approx(palm_flops_per_token(cfg, seq), rel=1e-12)
