"""COAT's FP8 activation casts as Triton kernels (#18, memory/fp8_triton.py): the reference's bits.

Under Triton's interpreter on CPU (the integer FP8 encoder, values times the scale's inverse) and compiled on CUDA (the
encoder, or the hardware's cvt.rn.satfinite where its first cast agrees: fp8_triton._checked), each cast must give
the FP8 codes and scales of :mod:`meshwright.optim.fp8_quant` exactly: per-tensor casts with their transposed copy
(E4M3 inputs and weights, E5M2 gradients) and 1 x 16 group casts, from fp32, bf16 and fp16, on shapes that do not
fill the tiles, and with NaN, inf, -0 and tiny values among them.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from meshwright.memory import fp8_cast, fp8_fused, fp8_triton
from meshwright.optim import fp8_quant
from meshwright.optim.coat_triton import triton_available

pytestmark = pytest.mark.skipif(not triton_available(), reason="triton is not installed")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
FORMATS = (torch.float8_e4m3fn, torch.float8_e5m2)


def _codes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


def _inputs(shape: tuple[int, ...], dtype: torch.dtype, device: str = "cpu", special: bool = False) -> torch.Tensor:
    g = torch.Generator().manual_seed(sum(shape))
    # magnitudes over six decades along the last dimension: groups and per-tensor scales both matter
    x = torch.randn(shape, generator=g) * torch.logspace(-3, 3, shape[-1])
    if special:
        flat = x.view(-1)
        flat[3], flat[7], flat[11] = -0.0, 1e-30, -1e-30  # -0 and values that flush to zero in FP8
    return x.to(dtype).to(device)


# The reference runs on CPU. Its scales divide tensor by tensor, correctly rounded on CPU and CUDA alike; they once
# divided by a Python number, which torch's CUDA kernel multiplies in as a reciprocal (one ulp off in 53% of the
# 1 x 16 scales of an H200 run, 2026-11-28, moving 0.06% of the codes by one)
def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return torch.equal(_codes(a), _codes(b))


# ``same``: how FP8 codes must agree, bit for bit by default; the GPU's conversion may write a NaN of the other sign
def _assert_per_tensor(x: torch.Tensor, f8: torch.dtype, same=_bits_equal) -> None:
    q, qt, scale = (t.cpu() for t in fp8_triton.quantize_per_tensor_t(x, f8))
    ref_q, ref_scale = fp8_quant.quantize_per_tensor(x.cpu().reshape(-1, x.shape[-1]), f8)
    assert same(q, ref_q)
    assert same(qt, ref_q.t().contiguous())  # the copy Triton 3.6's ptxas got wrong with Triton's own conversion
    assert torch.equal(scale, ref_scale)
    q1, scale1 = (t.cpu() for t in fp8_triton.quantize_per_tensor(x, f8))
    assert q1.shape == x.shape and same(q1.reshape(-1), ref_q.reshape(-1))
    assert torch.equal(scale1, ref_scale)


def _assert_groups(x: torch.Tensor, group: int = 16, same=_bits_equal) -> None:
    q, s = (t.cpu() for t in fp8_triton.quantize_last_dim_groups(x, group))
    ref_q, ref_s = fp8_quant.quantize_last_dim_groups(x.cpu(), group)
    assert q.shape == ref_q.shape and s.shape == ref_s.shape
    assert same(q, ref_q)
    assert torch.equal(s, ref_s)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(40, 48), (130, 70), (3, 5, 32)])
def test_interpreted_per_tensor_cast_and_transpose_equal_the_reference(dtype, shape):
    for f8 in FORMATS:
        _assert_per_tensor(_inputs(shape, dtype, special=True), f8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape,group", [((40, 48), 16), ((130, 160), 16), ((3, 5, 32), 16), ((9, 256), 128)])
def test_interpreted_group_cast_equals_the_reference(dtype, shape, group):
    _assert_groups(_inputs(shape, dtype, special=True), group)


def test_interpreted_casts_of_non_finite_values_equal_the_reference():
    """A NaN makes the absmax NaN and the scale 1 (as torch's amax and where do); an inf makes the scale inf."""
    for poison in (float("nan"), float("inf"), -float("inf")):
        x = _inputs((33, 48), torch.bfloat16)
        x[5, 17] = poison
        for f8 in FORMATS:
            _assert_per_tensor(x, f8)
        _assert_groups(x)


def test_a_tensor_of_tiny_values_keeps_its_zeros_and_codes_finite():
    """An absmax so small that fmax / amax overflows fp32 (here ~1e-37) is taken at fp8_quant.AMAX_FLOOR: without it
    the inverse is inf and each zero's code 0 * inf = NaN. The kernels floor it as the reference does."""
    x = _inputs((8, 32), torch.float32) * 1e-40
    x[:, ::3] = 0.0
    assert 0 < x.abs().max() < fp8_quant.AMAX_FLOOR and torch.isinf(448.0 / x.abs().max())
    for f8 in FORMATS:
        q, scale = fp8_quant.quantize_per_tensor(x, f8)
        assert not fp8_triton.nan_codes(_codes(q), f8).any() and bool((_codes(q)[:, ::3] == 0).all())
        assert bool((_codes(q) != 0).any())  # 1e-37 is small, not nothing: it keeps codes (times the floor's scale)
        assert (dequant := fp8_quant.dequantize_per_tensor(q, scale)).isfinite().all() and dequant.abs().max() > 0
        _assert_per_tensor(x, f8)
    q, s = fp8_quant.quantize_last_dim_groups(x)
    assert not fp8_triton.nan_codes(_codes(q), torch.float8_e4m3fn).any() and s.isfinite().all()
    _assert_groups(x)


def test_runs_takes_only_what_the_kernels_handle(monkeypatch):
    x = torch.randn(8, 32)
    assert not fp8_triton.runs(x)  # CPU tensors keep the compiled (eager) quantisers; the kernels run interpreted
    monkeypatch.setattr(torch.Tensor, "device", property(lambda self: torch.device("cuda")))  # only the checks
    assert fp8_triton.runs(x) and fp8_triton.runs(x, group=16)
    assert not fp8_triton.runs(x, group=24)  # a group must be a power of two
    assert not fp8_triton.runs(torch.randn(8, 40), group=16)  # the last dimension a multiple of the group
    assert not fp8_triton.runs(x.t())  # contiguous only
    assert not fp8_triton.runs(x.to(torch.int32))
    assert not fp8_triton.runs(x, torch.int8)
    fp8_triton.set_enabled(False)
    try:
        assert not fp8_triton.runs(x)
    finally:
        fp8_triton.set_enabled(True)


def test_a_failing_kernel_warns_once_and_hands_over_to_the_compiled_quantiser():
    calls = []

    def broken_kernel(x, dtype):
        calls.append(1)
        raise RuntimeError("no compiler for this GPU")

    cast = fp8_cast.TritonOrCompiled(broken_kernel, fp8_cast.compiled_quantize_per_tensor, lambda *a: True)
    x = torch.randn(16, 32)
    with pytest.warns(RuntimeWarning, match="Triton FP8 cast failed"):
        q, s = cast(x, torch.float8_e4m3fn)
    ref_q, ref_s = fp8_quant.quantize_per_tensor(x)
    assert torch.equal(_codes(q), _codes(ref_q)) and torch.equal(s, ref_s)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        cast(x, torch.float8_e4m3fn)
    assert calls == [1] and cast.kernel_failed


@cuda
@pytest.mark.parametrize("conversion", ["encoder", "hardware"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_casts_equal_the_reference_bit_for_bit(dtype, conversion):
    """Compiled: the codes and scales of the reference (on CPU), on a block-sized activation (4096 x 2048), a
    weight-shaped one and a ragged one, and on non-finite values; with the integer encoder and with the GPU's
    conversion unchecked (the checked default takes it where its first cast agrees). On an H200 (2026-11-28) the
    encoder's per-tensor casts gave torch's CUDA codes exactly at the 1.3B's shapes (bench_fp8_casts_gpu.py)."""
    assert fp8_triton.runs(torch.zeros(4, 16, device="cuda", dtype=dtype), group=16)
    same = _bits_equal if conversion == "encoder" else fp8_triton._same_codes
    old = fp8_triton.set_conversion(conversion)
    try:
        for shape in ((4096, 2048), (5632, 2048), (1000, 72)):
            x = _inputs(shape, dtype, "cuda", special=True)
            for f8 in FORMATS:
                _assert_per_tensor(x, f8, same)
            if shape[-1] % 16 == 0:
                _assert_groups(x, same=same)
        x = _inputs((64, 64), dtype, "cuda")
        x[1, 2] = float("nan")
        _assert_per_tensor(x, torch.float8_e4m3fn, same)
        _assert_groups(x, same=same)
    finally:
        fp8_triton.set_conversion(old)


@cuda
def test_cuda_fused_forwards_take_the_triton_casts():
    """The FP8 RMSNorm and SwiGLU forwards on CUDA: the compiled norm / product plus the Triton group cast, equal to
    the reference functions on CPU (codes and scales exactly, outputs within rounding)."""
    x = _inputs((256, 2048), torch.float32, "cuda")
    w = torch.rand(2048, device="cuda") + 0.5
    out, rstd, q, s = (t.cpu() for t in fp8_fused.fused_rmsnorm_forward(x, w, 1e-5, 16))
    r_out, r_rstd, r_q, r_s = fp8_fused.rmsnorm_forward(x.cpu(), w.cpu(), 1e-5, 16)
    assert torch.equal(_codes(q), _codes(r_q)) and torch.equal(s, r_s)
    torch.testing.assert_close(out, r_out)
    torch.testing.assert_close(rstd, r_rstd)
    a, b = (_inputs((256, 5632), torch.bfloat16, "cuda") for _ in range(2))
    prod, qa, sa, qb, sb = (t.cpu() for t in fp8_fused.fused_swiglu_forward(a, b, 16))
    r_prod, r_qa, r_sa, r_qb, r_sb = fp8_fused.swiglu_forward(a.cpu(), b.cpu(), 16)
    assert torch.equal(_codes(qa), _codes(r_qa)) and torch.equal(sa, r_sa)
    assert torch.equal(_codes(qb), _codes(r_qb)) and torch.equal(sb, r_sb)
    torch.testing.assert_close(prod, r_prod)
    assert not fp8_fused.fused_rmsnorm_forward.kernel_failed and not fp8_fused.fused_swiglu_forward.kernel_failed


@pytest.fixture
def checking(monkeypatch):
    """fp8_triton._checked on a pretend sm_90 GPU, outside graph capture, with no verdict recorded yet."""
    monkeypatch.setattr(fp8_triton, "_HW_AGREES", {})
    monkeypatch.setattr(fp8_triton, "_capturing", lambda: False)
    monkeypatch.setattr(fp8_triton, "_converts_fp8", lambda device: True)


def _fake_cast(calls, wrong_code_at=None):
    """A cast as fp8_triton runs one: cast(hw) -> (codes, scale); with ``wrong_code_at`` the hardware way writes
    one code wrong there (what ptxas did to Triton's own conversion on the H200)."""
    x = torch.randn(8, 32)
    q, s = fp8_quant.quantize_per_tensor(x)

    def cast(hw):
        calls.append(hw)
        out = q.clone()
        if hw and wrong_code_at is not None:
            out.view(torch.uint8)[wrong_code_at] ^= 0x7F
        return out, s.clone()
    return cast, q


def test_the_gpu_conversion_is_used_once_its_first_cast_agrees_with_the_encoder(checking):
    cuda_device, calls = torch.device("cuda"), []
    cast, ref = _fake_cast(calls)
    q, _ = fp8_triton._checked(("v",), cuda_device, cast)
    assert sorted(calls) == [False, True] and torch.equal(_codes(q), _codes(ref))  # checked once, both ways
    fp8_triton._checked(("v",), cuda_device, cast)
    assert calls[2:] == [True] and fp8_triton._HW_AGREES == {("v",): True}  # then the GPU's only
    fp8_triton._checked(("v",), torch.device("cpu"), cast)
    assert calls[-1] is False  # CPU: the interpreter has no FP8 conversion


def test_a_disagreeing_gpu_conversion_warns_once_and_the_variant_keeps_the_encoder(checking):
    calls = []
    cast, ref = _fake_cast(calls, wrong_code_at=(3, 5))
    with pytest.warns(RuntimeWarning, match="disagrees with the integer encoder"):
        q, _ = fp8_triton._checked(("bad", 0, torch.float32, torch.float8_e4m3fn), torch.device("cuda"), cast)
    assert torch.equal(_codes(q), _codes(ref))  # the encoder's codes, not the wrong ones
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp8_triton._checked(("bad", 0, torch.float32, torch.float8_e4m3fn), torch.device("cuda"), cast)
    assert sorted(calls) == [False, False, True]


def test_a_cast_of_zeros_decides_nothing(checking):
    """All-zero codes agree under any conversion: such a first input (a zero gradient) must not vouch for it."""
    calls = []
    zeros = fp8_quant.quantize_per_tensor(torch.zeros(8, 32))

    def cast(hw):
        calls.append(hw)
        return zeros
    fp8_triton._checked(("z",), torch.device("cuda"), cast)
    assert calls == [False] and fp8_triton._HW_AGREES == {}
    fake, _ = _fake_cast(calls)
    fp8_triton._checked(("z",), torch.device("cuda"), fake)
    assert fp8_triton._HW_AGREES == {("z",): True}


def test_a_gpu_without_fp8_conversion_or_a_failing_build_keeps_the_encoder(checking, monkeypatch):
    monkeypatch.setattr(fp8_triton, "_converts_fp8", lambda device: False)  # an A100: sm_80
    calls = []
    cast, _ = _fake_cast(calls)
    fp8_triton._checked(("v",), torch.device("cuda"), cast)
    assert calls == [False] and fp8_triton._HW_AGREES == {}

    def refusing(hw):  # ptxas without the instruction
        if hw:
            raise RuntimeError("ptxas fatal: cvt.rn.satfinite.e4m3x2.f32 requires sm_89\nmore")
        return cast(False)
    monkeypatch.setattr(fp8_triton, "_converts_fp8", lambda device: True)
    with pytest.warns(RuntimeWarning, match=r"failed \(RuntimeError: ptxas fatal: .* requires sm_89\)"):
        q, _ = fp8_triton._checked(("w", 0, torch.float32, torch.float8_e4m3fn), torch.device("cuda"), refusing)
    assert fp8_triton._HW_AGREES == {("w", 0, torch.float32, torch.float8_e4m3fn): False}


def test_the_conversion_check_waits_outside_graph_capture_and_can_be_switched(checking, monkeypatch):
    calls = []
    cast, _ = _fake_cast(calls)
    monkeypatch.setattr(fp8_triton, "_capturing", lambda: True)  # no host sync while a CUDA graph is captured
    fp8_triton._checked(("v",), torch.device("cuda"), cast)
    assert calls == [False] and fp8_triton._HW_AGREES == {}
    monkeypatch.setattr(fp8_triton, "_capturing", lambda: False)
    for mode, expected in (("encoder", False), ("hardware", True)):
        old = fp8_triton.set_conversion(mode)
        try:
            fp8_triton._checked(("v",), torch.device("cuda"), cast)
        finally:
            fp8_triton.set_conversion(old)
        assert calls[-1] is expected and fp8_triton._HW_AGREES == {}
    with pytest.raises(ValueError, match="conversion='fast' is invalid; valid: checked, hardware, encoder"):
        fp8_triton.set_conversion("fast")


def test_nan_codes_of_either_kind_count_as_the_same_code():
    e4, e5 = torch.float8_e4m3fn, torch.float8_e5m2
    a = torch.tensor([0x7F, 0x01, 0xFF], dtype=torch.uint8)
    assert fp8_triton._same_codes(a.view(e4), torch.tensor([0xFF, 0x01, 0x7F], dtype=torch.uint8).view(e4))
    assert not fp8_triton._same_codes(a.view(e4), torch.tensor([0x7E, 0x01, 0xFF], dtype=torch.uint8).view(e4))
    assert fp8_triton._same_codes(torch.tensor([0x7D], dtype=torch.uint8).view(e5),
                                  torch.tensor([0xFF], dtype=torch.uint8).view(e5))
    assert not fp8_triton._same_codes(torch.tensor([0x7C], dtype=torch.uint8).view(e5),  # inf is not NaN
                                      torch.tensor([0x7D], dtype=torch.uint8).view(e5))
