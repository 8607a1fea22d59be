"""CoatAdamW's Triton step (#18) against the reference ops: under Triton's interpreter on CPU, compiled on CUDA.

Stated bound (what the tests allow): FP8 codes at most one code apart where the exponents agree and
different on at most 1e-3 of the elements; exponents equal on >= 99% of the groups (one group of a small
tensor may differ) and otherwise 1/16 apart; the moments they stand for within 1e-4 relative where the
codes agree; weights within 0.01 lr of the reference (on CUDA see ``exact_math=False`` below for the
rare one-code moves). Measured on CPU (interpreter, these tests): FP8 codes and exponents identical,
weights identical after the first step and within 6e-8 after four (fp32 rounding of pow: the
interpreter's is exp2(e log2 x) in float64, torch's is SLEEF's powf), represented moments within 2e-5.
"""

from __future__ import annotations

import math

import pytest
import torch

from meshwright.errors import ConfigError
from meshwright.optim import CoatAdamW
from meshwright.optim.fp8_quant import GroupQuantized, dequantize_groups

pytest.importorskip("triton")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
LR = 1e-3


class _Odd(torch.nn.Module):
    """Parameters of awkward sizes: tiny, one short of a group, a group and one, several groups and a tail."""

    def __init__(self, device: str = "cpu") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.ps = torch.nn.ParameterList([torch.nn.Parameter(torch.randn(s, generator=g).to(device))
                                          for s in [(1,), (3,), (127,), (129,), (7, 100), (1000,)]])


def _run(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, seed0: int = 0) -> None:
    for s in range(steps):
        g = torch.Generator().manual_seed(seed0 + s)
        for i, p in enumerate(model.parameters()):  # gradients spanning many decades, as real ones do
            grad = torch.randn(p.shape, generator=g) * 10.0 ** (-((i + s) % 7))
            if i == 4:
                grad[0, :50] = 0.0  # a group with zeros in it (all-zero groups: test_coat_triton_edges.py)
            p.grad = grad.to(p.device)
        opt.step()


def _assert_close_to_reference(ref_model, ref_opt, model, opt, lr: float = LR, exact_math: bool = True) -> None:
    """``exact_math``: IEEE math on both sides (the interpreter against torch on CPU). Otherwise (CUDA,
    where torch's kernels contract to FMAs and divide by scalars via reciprocals, and the fast mode uses
    approximate exp2/log2) an FP8 code may now and then land one step away, which moves its weight by a
    fraction of one Adam step: allowed on 1e-3 of the elements (at least 2 per tensor), up to 0.5 lr."""
    group_size = {id(p): g["group_size"] for g in ref_opt.param_groups for p in g["params"]}
    for p, q in zip(ref_model.parameters(), model.parameters()):
        diff = (p - q).abs()
        if p.numel() == 0:
            pass
        elif exact_math:
            assert diff.max().item() <= 0.01 * lr
        else:
            assert (diff > 0.01 * lr).sum().item() <= max(2, 1e-3 * p.numel()) and diff.max().item() <= 0.5 * lr
        st_r, st_t = ref_opt.state[p], opt.state[q]
        assert torch.equal(st_r["step"], st_t["step"])
        for key, t in st_r.items():
            u = st_t[key]
            assert t.dtype == u.dtype and t.shape == u.shape and t.device == u.device, key
        gs = group_size[id(p)]
        for name in ("exp_avg", "exp_avg_sq"):
            k_r, k_t = st_r[f"{name}_expand"], st_t[f"{name}_expand"]
            assert (k_r != k_t).sum().item() <= max(1, 0.01 * k_r.numel()), name
            if k_r.numel() == 0:
                continue
            assert (k_r - k_t).abs().max().item() <= 1 / 16, name
            a, b = st_r[name].view(torch.uint8).int(), st_t[name].view(torch.uint8).int()
            same_k = (k_r == k_t).repeat_interleave(gs)[: a.numel()]
            assert (a - b)[same_k].abs().max().item() <= 1, name  # adjacent codes of one sign differ by one
            assert (a != b).sum().item() <= (1e-3 * a.numel() if exact_math else max(2, 1e-3 * a.numel())), name
            # the values they stand for: the metadata of one-value groups (k = 1024) is ill-conditioned on
            # purpose (scale = (max/c)^1024 with c = sqrt(max)^2), so compare what a step would read
            x_r, x_t = (dequantize_groups(GroupQuantized(*(st[f"{name}{m}"] for m in ("", "_scale", "_center", "_expand"))),
                                          group_size=gs) for st in (st_r, st_t))
            torch.testing.assert_close(x_t[a == b], x_r[a == b], rtol=1e-4, atol=0)


_DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", _DEVICES)
@pytest.mark.parametrize("dtype", [E4M3, E5M2])
def test_fp8_codec_equals_torchs_casts_on_every_code(dtype, device):
    """The kernel reads and writes FP8 as bytes: its decoder on all 256 codes and its encoder on every
    code, every midpoint between neighbours (ties to even), one fp32 ulp either side, values below
    half the smallest subnormal, +-0 and NaN must give torch's casts bit for bit."""
    from meshwright.optim.coat_triton import KERNEL_FORMATS, kernels

    fmax = torch.finfo(dtype).max
    codes = torch.arange(256, dtype=torch.uint8)
    values = codes.view(dtype).float()
    finite = values[torch.isfinite(values)].unique()
    mids = (finite[1:] + finite[:-1]) / 2  # exact in fp32: FP8 has few mantissa bits
    x = torch.cat([finite, mids, torch.nextafter(mids, torch.full_like(mids, math.inf)),
                   torch.nextafter(mids, torch.full_like(mids, -math.inf)),
                   torch.tensor([0.0, -0.0, math.nan, -math.nan, 1e-30, -1e-30, 2.0 ** -150, fmax, -fmax]),
                   torch.randn(2000) * 10.0 ** torch.randint(-8, 4, (2000,)).float()]).clamp(-fmax, fmax)
    n = max(x.numel(), 256)
    x = torch.cat([x, x.new_zeros(n - x.numel())])
    byte = torch.cat([codes, codes.new_zeros(n - 256)])
    x, byte = x.to(device), byte.to(device)
    code, y = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, device=device)
    mbits, bias, e5m2 = KERNEL_FORMATS[dtype]
    kernels(device == "cpu").fp8_codec_kernel[(triton_cdiv(n, 1024),)](x, code, byte, y, n, MBITS=mbits, BIAS=bias,
                                                                       E5M2=e5m2, BLOCK=1024)
    expected = x.to(dtype).view(torch.uint8)
    assert torch.equal(code.cpu(), expected.cpu()), (x[code != expected], code[code != expected], expected[code != expected])
    got, want = y[:256].cpu(), values
    assert torch.equal(got.isnan(), want.isnan())
    keep = ~want.isnan()
    assert torch.equal(got[keep].view(torch.int32), want[keep].view(torch.int32))  # +-0 and subnormals included


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@pytest.mark.parametrize("kw", [dict(v_format="e5m2"), dict(m_format="e5m2", group_size=100, expand=False, weight_decay=0.0)],
                         ids=["e4m3-e5m2", "e5m2-g100-noexpand"])
def test_interpreted_kernel_matches_the_reference(kw):
    ref, tri = _Odd(), _Odd()
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference", **kw)
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton", **kw)
    _run(ref, ref_opt, 3)
    versions = [p._version for p in tri.parameters()]
    _run(tri, tri_opt, 3)
    assert all(p._version > v for p, v in zip(tri.parameters(), versions))  # in-place writes are visible to autograd
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt)
    assert tri_opt.state_bytes() == ref_opt.state_bytes()


@pytest.mark.filterwarnings("ignore:divide by zero encountered in log2")  # numpy's log2(0) = -inf, as intended
def test_fast_math_code_paths_under_the_interpreter(monkeypatch):
    """The CUDA default's code paths (reciprocals, select for signs, exp2(e log2 x) in fp32) with the
    interpreter's IEEE exp2/log2 in place of the hardware's approximations: within the CUDA bound."""
    from meshwright.optim import coat_triton

    monkeypatch.setattr(coat_triton, "INTERPRET_MATH", 3)
    ref, tri = _Odd(), _Odd()
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, v_format="e5m2", fused="reference")
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, v_format="e5m2", fused="triton")
    _run(ref, ref_opt, 3)
    _run(tri, tri_opt, 3)
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt, exact_math=False)


def test_state_dict_and_checkpoints_cross_between_triton_and_reference(tmp_path):
    tri, ref = _Odd(), _Odd()
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, fused="triton")
    _run(tri, tri_opt, 2)
    path = tmp_path / "triton.pt"
    torch.save({"model": tri.state_dict(), "optim": tri_opt.state_dict()}, path)
    ckpt = torch.load(path, weights_only=True)
    ref.load_state_dict(ckpt["model"])
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, fused="reference")
    ref_opt.load_state_dict(ckpt["optim"])
    assert set(ref_opt.state_dict()["state"][0]) == set(tri_opt.state_dict()["state"][0])
    # the reference resumes the Triton run, and the Triton step resumes a reference checkpoint
    back = _Odd()
    back_opt = CoatAdamW(back.parameters(), lr=LR, fused="triton")
    ckpt = torch.load(path, weights_only=True)  # a fresh copy: torch's loader shares the `step` tensors
    back.load_state_dict(ckpt["model"])
    back_opt.load_state_dict(ckpt["optim"])
    kept = {k: v.clone() for k, v in ckpt["optim"]["state"][5].items() if k != "step"}
    _run(ref, ref_opt, 2, seed0=100)
    _run(back, back_opt, 2, seed0=100)
    _assert_close_to_reference(ref, ref_opt, back, back_opt)
    for k, v in kept.items():  # in-place updates never reach the loaded checkpoint's tensors
        assert torch.equal(ckpt["optim"]["state"][5][k].view(torch.uint8) if v.dtype in (E4M3, E5M2) else
                           ckpt["optim"]["state"][5][k], v.view(torch.uint8) if v.dtype in (E4M3, E5M2) else v), k


def test_selection_errors_and_fallback(monkeypatch):
    with pytest.raises(ConfigError, match="optimizer.fused"):
        CoatAdamW(_Odd().parameters(), fused="tritonn")
    model = torch.nn.Linear(3, 2).double()
    model.weight.grad, model.bias.grad = torch.ones_like(model.weight), torch.ones_like(model.bias)
    with pytest.raises(ConfigError, match="optimizer.fused='triton' is invalid; valid: fp32 weights"):
        CoatAdamW(model.parameters(), fused="triton").step()
    from meshwright.optim.coat_triton import coat_adamw_triton

    p, g = torch.zeros(300), torch.zeros(300)
    meta = [torch.ones(3) for _ in range(3)]
    short = (torch.zeros(299, dtype=E4M3), *meta)  # one element short: the kernel would write past it
    with pytest.raises(ConfigError, match="optimizer.state.*moments of 300 elements"):
        coat_adamw_triton([p], [g], [short], [(torch.zeros(300, dtype=E4M3), *meta)], lr=LR, weight_decay=0.0,
                          beta1=0.9, beta2=0.999, eps=1e-8, step=1.0, group_size=128, m_dtype=E4M3, v_dtype=E4M3,
                          expand=True, k_min=1 / 16)
    cpu = torch.nn.Parameter(torch.zeros(4))
    assert not CoatAdamW([cpu])._use_triton(cpu, torch.zeros(4))  # None on CPU: the reference ops
    assert CoatAdamW([cpu], fused="triton")._use_triton(cpu, torch.zeros(4))  # asked for: interpreted
    # fused=None: a Triton failure warns once and the step goes on through the next path (here the reference)
    import meshwright.optim.coat as coat

    def broken(*args, **kwargs):
        raise RuntimeError("no ptxas")

    monkeypatch.setattr(coat, "coat_adamw_triton", broken)
    a, b = _Odd(), _Odd()
    opt = CoatAdamW(a.parameters(), lr=LR)
    monkeypatch.setattr(opt, "_use_triton", lambda p, g: not opt._triton_failed)
    ref_opt = CoatAdamW(b.parameters(), lr=LR, fused="reference")
    with pytest.warns(RuntimeWarning, match="Triton step failed"):
        _run(a, opt, 2)
    _run(b, ref_opt, 2)
    assert opt._triton_failed
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    strict_model = _Odd()
    strict = CoatAdamW(strict_model.parameters(), fused="triton")  # asked for explicitly: no silent fallback
    with pytest.raises(RuntimeError, match="no ptxas"):
        _run(strict_model, strict, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (the compiled Triton kernel)")
@pytest.mark.parametrize("math_mode", ["fast", "precise"])
def test_cuda_kernel_matches_the_reference_and_is_the_default(monkeypatch, math_mode):
    from meshwright.optim import coat_triton

    monkeypatch.setattr(coat_triton, "MATH", math_mode)
    ref, tri, auto = _Odd("cuda"), _Odd("cuda"), _Odd("cuda")
    ref_opt = CoatAdamW(ref.parameters(), lr=LR, v_format="e5m2", fused="reference")
    tri_opt = CoatAdamW(tri.parameters(), lr=LR, v_format="e5m2", fused="triton")
    auto_opt = CoatAdamW(auto.parameters(), lr=LR, v_format="e5m2")  # None: Triton on CUDA
    for model, opt in ((ref, ref_opt), (tri, tri_opt), (auto, auto_opt)):
        _run(model, opt, 4)
    torch.cuda.synchronize()
    _assert_close_to_reference(ref, ref_opt, tri, tri_opt, exact_math=False)
    first = {k: v.data_ptr() for k, v in auto_opt.state[next(auto.parameters())].items()}
    _run(auto, auto_opt, 1, seed0=10)
    assert not auto_opt._triton_failed
    assert {k: v.data_ptr() for k, v in auto_opt.state[next(auto.parameters())].items()} == first  # in place
    _run(tri, tri_opt, 1, seed0=10)
    for p, q in zip(tri.parameters(), auto.parameters()):
        assert torch.equal(p, q)  # the default is the same kernel
