"""COAT FP8 activations: mixed-granularity FP8 storage of what blocks save for backward."""

from __future__ import annotations

import copy

import pytest
import torch

from meshwright.errors import ConfigError
from meshwright.memory.accounting import count_saved_bytes
from meshwright.memory.fp8_activations import (FP8Linear, FP8RMSNorm, FP8SwiGLU, _FP8GeluFn, _FP8LayerNormFn,
                                               _FP8LinearFn, _FP8RMSNormFn, _FP8SwiGLUProductFn, _QuantCache,
                                               apply_fp8_activations, block_saved_bytes_per_token,
                                               fp8_act_layers_from_plan, fp8_activation_saved_fraction)
from meshwright.memory.fp8_gemm import cpu_scaled_mm_runs
from meshwright.models import build_model, lm_loss
from meshwright.models.layers import RMSNorm
from meshwright.optim.fp8_quant import (dequantize_last_dim_groups, dequantize_per_tensor, quantize_last_dim_groups,
                                        quantize_per_tensor)
from meshwright.plan import LayerStrategy, Plan, Savers


def test_1x16_groups_beat_per_tensor_on_outlier_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 32, 256, generator=g)
    # Outlier channels, as LLM activations have. FP8's own exponent absorbs ratios up to ~1e3; beyond,
    # one per-tensor scale pushes the ordinary channels into E4M3's coarse subnormals.
    x[..., 7] *= 2e4
    x[..., 130] *= 5e3
    q, s = quantize_per_tensor(x)
    err_tensor = (dequantize_per_tensor(q, s) - x).norm() / x.norm()
    gq, gs = quantize_last_dim_groups(x, 16)
    err_group = (dequantize_last_dim_groups(gq, gs, 16) - x).norm() / x.norm()
    normal = torch.ones(256, dtype=torch.bool)
    normal[[7, 130]] = False
    err_t_normal = ((dequantize_per_tensor(q, s) - x)[..., normal].norm() / x[..., normal].norm())
    err_g_normal = ((dequantize_last_dim_groups(gq, gs, 16) - x)[..., normal].norm() / x[..., normal].norm())
    assert err_group < err_tensor
    assert err_g_normal < 0.5 * err_t_normal  # the ordinary channels keep their resolution
    assert gq.dtype == torch.float8_e4m3fn and gs.shape == (4, 32, 16)


def _fp8_exact(shape: tuple[int, ...], seed: int, group: int | None = 16) -> torch.Tensor:
    """Values that FP8 stores losslessly: E4M3 numbers with 448 in every group (scale exactly 1)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g) * 40).to(torch.float8_e4m3fn).float()
    if group is None:
        x.view(-1)[0] = 448.0
    else:
        x.unflatten(-1, (-1, group))[..., 0] = 448.0
    return x / 64  # a power of two keeps every value exactly representable after rescaling


def _grads(fn, *inputs):
    inputs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*inputs)
    g = torch.Generator().manual_seed(9)
    out.backward(torch.randn(out.shape, generator=g))
    return out.detach(), [t.grad for t in inputs]


@pytest.mark.parametrize("case", ["linear", "rmsnorm", "layernorm", "swiglu", "gelu"])
def test_backward_matches_autograd_when_fp8_is_lossless(case):
    """With inputs FP8 stores exactly, each custom backward must equal autograd's to float rounding."""
    x = _fp8_exact((2, 8, 64), seed=1, group=None if case == "linear" else 16)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(48 if case == "linear" else 64, 64, generator=g)[0 if case != "linear" else slice(None)]
    b = torch.randn(w.shape[0], generator=g)
    if case == "linear":
        ours = lambda x, w, b: _FP8LinearFn.apply(x, w, b, _QuantCache(), torch.float8_e4m3fn)  # noqa: E731
        ref = torch.nn.functional.linear
        args = (x, w, b)
    elif case == "rmsnorm":
        ours = lambda x, w: _FP8RMSNormFn.apply(x, w, 1e-5)  # noqa: E731
        ref = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * w  # noqa: E731
        args = (x, w)
    elif case == "layernorm":
        ours = lambda x, w, b: _FP8LayerNormFn.apply(x, w, b, 1e-5)  # noqa: E731
        ref = lambda x, w, b: torch.nn.functional.layer_norm(x, (64,), w, b, 1e-5)  # noqa: E731
        args = (x, w, b)
    elif case == "swiglu":
        x2 = _fp8_exact((2, 8, 64), seed=3)
        ours = _FP8SwiGLUProductFn.apply
        ref = lambda a, b: torch.nn.functional.silu(a) * b  # noqa: E731
        args = (x, x2)
    else:
        ours = _FP8GeluFn.apply
        ref = lambda a: torch.nn.functional.gelu(a, approximate="tanh")  # noqa: E731
        args = (x,)
    out_o, grads_o = _grads(ours, *args)
    out_r, grads_r = _grads(ref, *args)
    torch.testing.assert_close(out_o, out_r, rtol=1e-5, atol=1e-5)
    for go, gr in zip(grads_o, grads_r):
        torch.testing.assert_close(go, gr, rtol=1e-4, atol=1e-4)


def _block_saved(model, batch: int, seq: int, dtype: torch.dtype) -> int:
    h = torch.randn(batch, seq, model.cfg.d_model, dtype=dtype, requires_grad=True)
    rope = model.rope(seq)
    with count_saved_bytes(model, exclude=list(rope) if rope else []) as sb:
        model.layers["0"](h, rope)
    return sb.total


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
def test_saved_bytes_fall_and_match_the_planner_formula(preset, dtype):
    model = build_model(preset, seed=0).to(dtype)
    fp8 = copy.deepcopy(model)
    assert apply_fp8_activations(fp8) == [0, 1, 2, 3]
    batch, seq = 2, 64
    base, ours = _block_saved(model, batch, seq, dtype), _block_saved(fp8, batch, seq, dtype)
    tokens, b = batch * seq, dtype.itemsize
    assert base == block_saved_bytes_per_token(model.cfg, False, dtype_bytes=b) * tokens
    assert ours == block_saved_bytes_per_token(model.cfg, True, tokens=tokens, dtype_bytes=b) * tokens
    gemm = copy.deepcopy(model)
    apply_fp8_activations(gemm, gemm_layers=None, backend="emulate")
    assert _block_saved(gemm, batch, seq, dtype) == block_saved_bytes_per_token(
        model.cfg, True, tokens=tokens, dtype_bytes=b, fp8_gemm=True) * tokens
    ratio = ours / base
    limit = {("tiny", 4): 0.36, ("tiny-gpt2", 4): 0.47, ("tiny", 2): 0.49, ("tiny-gpt2", 2): 0.68}[(preset, b)]
    assert ratio < limit, ratio
    assert abs(fp8_activation_saved_fraction(model.cfg, b) - ratio) < 1e-3


def test_forward_unchanged_and_gradients_close_on_tiny():
    model = build_model("tiny", seed=0)
    fp8 = copy.deepcopy(model)
    apply_fp8_activations(fp8)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 256, (2, 33), generator=g)
    loss = lm_loss(model(tokens[:, :-1]), tokens[:, 1:])
    loss8 = lm_loss(fp8(tokens[:, :-1]), tokens[:, 1:])
    assert torch.equal(loss, loss8)  # only the saved copies are FP8; forward values are untouched
    loss.backward()
    loss8.backward()
    flat = torch.cat([p.grad.flatten() for p in model.parameters()])
    flat8 = torch.cat([p.grad.flatten() for p in fp8.parameters()])
    rel = ((flat - flat8).norm() / flat.norm()).item()
    assert 0 < rel < 0.06, rel  # E4M3 keeps 3 mantissa bits: a few percent, not zero (it is really FP8)
    cos = torch.nn.functional.cosine_similarity(flat, flat8, dim=0).item()
    assert cos > 0.998


def test_per_layer_selection_and_plan_flags():
    model = build_model("tiny", seed=0)
    plan = Plan(layers=[LayerStrategy(repeat=1), LayerStrategy(savers=Savers(fp8_act=True), repeat=2),
                        LayerStrategy(repeat=1)])
    flags = fp8_act_layers_from_plan(plan)
    assert flags == [False, True, True, False]
    assert apply_fp8_activations(model, flags) == [1, 2]
    assert type(model.layers["1"].attention_norm) is FP8RMSNorm
    assert type(model.layers["1"].feed_forward) is FP8SwiGLU
    assert type(model.layers["1"].attention.wq) is FP8Linear
    assert type(model.layers["1"].attention.wo) is torch.nn.Linear  # its input is SDPA's saved output
    assert type(model.layers["0"].attention_norm) is RMSNorm
    assert type(model.output) is torch.nn.Linear
    # parameter names (hence checkpoints) are unchanged
    assert set(dict(model.named_parameters())) == set(dict(build_model("tiny", seed=0).named_parameters()))
    with pytest.raises(ConfigError, match=r"fp8_act.layers=7 is invalid"):
        apply_fp8_activations(build_model("tiny", seed=0), [7])
    with pytest.raises(ConfigError, match="fp8_act.layers"):
        apply_fp8_activations(build_model("tiny", seed=0), [True, False])
    with pytest.raises(ConfigError, match="fp8_format"):
        apply_fp8_activations(build_model("tiny", seed=0), linear_format="int8")


def test_no_grad_forward_is_plain():
    model = build_model("tiny", seed=0)
    apply_fp8_activations(model)
    tokens = torch.randint(0, 256, (1, 16))
    with torch.no_grad():
        out = model(tokens)
    assert out.shape == (1, 16, 256) and not out.requires_grad


def test_short_training_run_with_fp8_activations_stays_close():
    """CoatAdamW with FP8 activations against fp32 AdamW, the mean over batch seeds (test_coat_optimizer.tail_gaps)."""
    from test_coat_optimizer import tail_gaps

    from meshwright.optim import CoatAdamW

    gaps = tail_gaps(lambda p: CoatAdamW(p, lr=3e-3, weight_decay=0.01), fp8_act=True)
    assert abs(sum(gaps) / len(gaps)) < 0.02 and max(map(abs, gaps)) < 0.05, gaps


# ---- every precision the runtime uses; FP8 GEMMs (#18) ------------------------------------------
# Stated FP8 error: rounding to FP8 changes a value by at most u relative (u = 2^-4 for E4M3, 2^-3 for
# E5M2 normals), an rms of at most u/sqrt(3) for uniformly spread mantissas; errors of independent
# operands add in quadrature. So for Gaussian data a GEMM's relative L2 error is at most
# E4M3_RMS*sqrt(2) (x and W in E4M3, forward) and sqrt(E4M3_RMS^2 + E5M2_RMS^2) (backward: E5M2 output
# gradient times an E4M3 operand); with FP8 storage only, the weight gradient's is at most E4M3_RMS.
E4M3_RMS, E5M2_RMS = 2 ** -4 / 3 ** 0.5, 2 ** -3 / 3 ** 0.5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _linear_run(fn, dtype=torch.float32, autocast=False, m=4 * 32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m // 32, 32, 64, generator=g).to(dtype).requires_grad_()
    w = (torch.randn(48, 64, generator=g) / 8).to(dtype).requires_grad_()
    b = torch.randn(48, generator=g).to(dtype).requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        y = fn(x, w, b)
    y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
    return y.detach(), x.grad, w.grad, b.grad


def _fp8_linear(gemm):
    return lambda x, w, b: _FP8LinearFn.apply(x, w, b, _QuantCache(), torch.float8_e4m3fn, gemm)


@pytest.mark.parametrize("gemm", [None, "emulate"])
def test_linear_gradients_within_the_stated_fp8_error(gemm):
    y, gx, gw, gb = _linear_run(_fp8_linear(gemm))
    ry, rgx, rgw, rgb = _linear_run(torch.nn.functional.linear)
    torch.testing.assert_close(gb, rgb)
    if gemm is None:  # FP8 storage only: forward and input gradient exact, weight gradient within E4M3
        assert torch.equal(y, ry) and torch.equal(gx, rgx)
        assert 0 < _rel(gw, rgw) < E4M3_RMS
    else:
        assert 0 < _rel(y, ry) < E4M3_RMS * 2 ** 0.5
        for ours, ref in ((gx, rgx), (gw, rgw)):
            assert 0 < _rel(ours, ref) < (E4M3_RMS ** 2 + E5M2_RMS ** 2) ** 0.5


@pytest.mark.parametrize("gemm", [None, "emulate"])
@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_linear_runs_under_bf16_autocast_and_bf16_parameters(gemm, precision):
    """The bug of #18: under autocast the backward multiplied a bf16 gradient by the fp32 weight."""
    autocast = precision == "autocast"
    dtype = torch.float32 if autocast else torch.bfloat16
    y, gx, gw, gb = _linear_run(_fp8_linear(gemm), dtype, autocast)
    ry, rgx, rgw, rgb = _linear_run(torch.nn.functional.linear, dtype, autocast)
    assert y.dtype == ry.dtype == torch.bfloat16
    assert gx.dtype == gw.dtype == gb.dtype == dtype  # gradients in the dtypes of x, W, b
    bf16 = 2 ** -8  # bf16 rounding of the reference itself
    assert _rel(gx, rgx) < (bf16 if gemm is None else (E4M3_RMS ** 2 + E5M2_RMS ** 2) ** 0.5 + bf16)
    assert _rel(gw, rgw) < (E4M3_RMS if gemm is None else (E4M3_RMS ** 2 + E5M2_RMS ** 2) ** 0.5) + bf16


def _emulated_reference(x, w, b, gy):
    """COAT's FP8 linear written out: E4M3 per-tensor x and W, E5M2 per-tensor output gradient."""
    def dq(t, dtype):
        q, s = quantize_per_tensor(t, dtype)
        return dequantize_per_tensor(q, s)
    xq, wq, gq = dq(x, torch.float8_e4m3fn).reshape(-1, 64), dq(w, torch.float8_e4m3fn), dq(gy, torch.float8_e5m2)
    gq = gq.reshape(-1, gq.shape[-1])
    return (xq @ wq.t() + b).view(*x.shape[:-1], -1), (gq @ wq).view(x.shape), gq.t() @ xq


def test_emulated_fp8_gemm_equals_a_written_out_reference():
    g = torch.Generator().manual_seed(3)
    x, w, b = torch.randn(2, 16, 64, generator=g), torch.randn(48, 64, generator=g), torch.randn(48, generator=g)
    gy = torch.randn(2, 16, 48, generator=g)
    xs, ws, bs = (t.clone().requires_grad_() for t in (x, w, b))
    y = _FP8LinearFn.apply(xs, ws, bs, _QuantCache(), torch.float8_e4m3fn, "emulate")
    y.backward(gy)
    ry, rgx, rgw = _emulated_reference(x, w, b, gy)
    torch.testing.assert_close(y, ry, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(xs.grad, rgx, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ws.grad, rgw, rtol=1e-6, atol=1e-6)




@pytest.mark.skipif(not cpu_scaled_mm_runs(), reason="this torch has no CPU torch._scaled_mm")
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("tokens", [128, 132])  # 132: not divisible by 16, _scaled_mm falls back
def test_scaled_mm_path_matches_the_emulation(autocast, tokens):
    """torch 2.13 CPU implements _scaled_mm: the real FP8 GEMM path (layouts, scales, E5M2 x E4M3
    operands) is exercised here and equals the emulation up to accumulation order."""
    def run(gemm):
        g = torch.Generator().manual_seed(5)
        x = torch.randn(tokens, 64, generator=g).requires_grad_()
        w = torch.randn(48, 64, generator=g).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            y = _FP8LinearFn.apply(x, w, None, _QuantCache(), torch.float8_e4m3fn, gemm)
        y.backward(torch.randn(y.shape, generator=g).to(y.dtype))
        return y, x.grad, w.grad

    for ours, ref in zip(run("scaled_mm"), run("emulate")):
        assert ours.dtype == ref.dtype
        if autocast:  # the emulation rounds its dequantised operands and its result to bf16
            assert _rel(ours, ref) < 2 ** -7
        else:
            torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["tiny", "tiny-gpt2"])
@pytest.mark.parametrize("precision", ["autocast", "bf16", "fp32"])
@pytest.mark.parametrize("gemm", [False, True])
def test_whole_model_gradients_in_every_precision(preset, precision, gemm):
    model = build_model(preset, seed=0)
    if precision == "bf16":
        model = model.to(torch.bfloat16)
    fp8 = copy.deepcopy(model)
    apply_fp8_activations(fp8, gemm_layers=None if gemm else (), backend="emulate")
    tokens = torch.randint(0, 256, (2, 17), generator=torch.Generator().manual_seed(1))
    grads = []
    for m in (model, fp8):
        with torch.autocast("cpu", torch.bfloat16, enabled=precision == "autocast"):
            loss = lm_loss(m(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        assert all(p.grad.dtype == p.dtype for p in m.parameters())
        grads.append(torch.cat([p.grad.float().flatten() for p in m.parameters()]))
    rel, cos = _rel(grads[1], grads[0]), torch.nn.functional.cosine_similarity(*grads, dim=0).item()
    # measured: storage 0.011-0.021, GEMMs 0.087-0.100 (every linear of every block in FP8)
    assert 0 < rel < (0.03 if not gemm else 0.12), rel
    assert cos > (0.999 if not gemm else 0.99), cos


def test_fp8_gemm_per_layer_from_the_plan_and_bad_input():
    from meshwright.config.io import from_dict, to_dict
    from meshwright.memory.fp8_activations import fp8_gemm_layers_from_plan

    both = Savers(fp8_act=True, fp8_gemm=True)
    plan = Plan(layers=[LayerStrategy(repeat=1), LayerStrategy(savers=both, repeat=2),
                        LayerStrategy(savers=Savers(fp8_act=True), repeat=1)])
    assert from_dict(Plan, to_dict(plan)) == plan  # YAML/JSON round trip keeps the flag
    model = build_model("tiny", seed=0)
    assert apply_fp8_activations(model, fp8_act_layers_from_plan(plan), gemm_layers=fp8_gemm_layers_from_plan(plan)) == [1, 2, 3]
    assert model.layers["1"].attention.wq._fp8_gemm == "auto"
    assert type(model.layers["1"].attention.wo) is FP8Linear  # FP8 GEMMs take wo too
    assert model.layers["3"].attention.wq._fp8_gemm is None and type(model.layers["3"].attention.wo) is torch.nn.Linear
    with pytest.raises(ConfigError, match=r"fp8_gemm=True is invalid"):
        from_dict(Plan, {"layers": [{"savers": {"fp8_gemm": True}}]})
    with pytest.raises(ConfigError, match="fp8_gemm.layers"):
        apply_fp8_activations(build_model("tiny", seed=0), [0], gemm_layers=[1])
    with pytest.raises(ConfigError, match="linear_format"):
        apply_fp8_activations(build_model("tiny", seed=0), linear_format="e5m2", gemm_layers=None)
    with pytest.raises(ConfigError, match="fp8_gemm.backend"):
        apply_fp8_activations(build_model("tiny", seed=0), backend="cublas")


@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.get_device_capability() < (8, 9),
                    reason="needs a GPU with FP8 tensor cores (compute capability >= 8.9)")
def test_cuda_scaled_mm_matches_the_emulation():
    from meshwright.memory.fp8_gemm import gemm_backend

    assert gemm_backend("cuda") == "scaled_mm"
    g = torch.Generator(device="cuda").manual_seed(0)

    def run(gemm):
        x = torch.randn(256, 512, device="cuda", generator=g.manual_seed(0)).requires_grad_()
        w = torch.randn(384, 512, device="cuda", generator=g).requires_grad_()
        with torch.autocast("cuda", torch.bfloat16):
            y = _FP8LinearFn.apply(x, w, None, _QuantCache(), torch.float8_e4m3fn, gemm)
        y.backward(torch.ones_like(y))
        return y.float(), x.grad, w.grad

    for ours, ref in zip(run("scaled_mm"), run("emulate")):
        assert _rel(ours, ref) < 2 ** -7


def test_the_runtime_applies_fp8_gemm_from_the_plan():
    from meshwright.parallel.runtime import apply_plan_savers

    model = build_model("tiny", seed=0)
    plan = Plan(layers=[LayerStrategy(savers=Savers(fp8_act=True, fp8_gemm=True), repeat=2),
                        LayerStrategy(savers=Savers(fp8_act=True), repeat=2)])
    assert apply_plan_savers(model, plan, seed=0)["fp8_act"] == [0, 1, 2, 3]
    assert [model.layers[str(i)].feed_forward.w2._fp8_gemm for i in range(4)] == ["auto", "auto", None, None]


def test_compiled_quantisers_are_bit_identical_to_the_eager_ones():
    """GPU tensors go through torch.compile'd quantisers (memory/fp8_cast.py); forced onto CPU here."""
    from meshwright.memory.fp8_cast import CompiledOnDevices
    from meshwright.optim import fp8_quant

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 40, 72, generator=g) * torch.logspace(-3, 3, 72)).to(torch.bfloat16)
    for fn, args in ((fp8_quant.quantize_per_tensor, (torch.float8_e5m2,)), (fp8_quant.quantize_last_dim_groups, (16,))):
        compiled = CompiledOnDevices(fn, devices=("cpu",))
        ours, ref = compiled(x, *args), fn(x, *args)
        assert not compiled.broken
        for a, b in zip(ours, ref):
            assert a.dtype == b.dtype and a.shape == b.shape
            assert torch.equal(a.view(torch.uint8) if a.element_size() == 1 else a,
                               b.view(torch.uint8) if b.element_size() == 1 else b)
    broken = CompiledOnDevices(lambda t: (_ for _ in ()).throw(RuntimeError("x")), devices=("cpu",))
    broken._compiled = broken.fn  # a compiler that fails: warn once, then the eager function
    with pytest.warns(RuntimeWarning, match="torch.compile failed"), pytest.raises(RuntimeError):
        broken(x)  # the eager function raises too here; a real quantiser would return its result
    assert broken.broken
