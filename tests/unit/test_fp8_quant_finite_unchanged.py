"""The non-finite handling added to quantize_groups (NaN/inf left out of the group statistics) must not change
a single bit for finite inputs: CoatAdamW's trajectories and every figure measured before it stay valid.

``_quantize_groups_979beb9`` is the function as it was at commit 979beb9 (before the change), kept verbatim
here so the comparison does not need git; the helpers it calls (_grouped, expansion_exponent, fp8_max) were
not changed by that commit.
"""

from __future__ import annotations

import pytest
import torch

from meshwright.optim import fp8_quant as fq


def _quantize_groups_979beb9(x: torch.Tensor, group_size: int = 128, dtype: torch.dtype = torch.float8_e4m3fn,
                             expand: bool = True, k_min: float = fq.K_MIN) -> fq.GroupQuantized:
    g = fq._grouped(x, group_size)
    mag = g.abs()
    amax = mag.amax(dim=1)
    nonzero = amax > 0
    fmax = fq.fp8_max(dtype)
    if expand:
        amin = torch.where(mag > 0, mag, torch.full_like(mag, float("inf"))).amin(dim=1)
        amax_s = torch.where(nonzero, amax, torch.ones_like(amax))
        amin_s = torch.where(nonzero, amin, torch.ones_like(amin))
        center = torch.sqrt(amax_s) * torch.sqrt(amin_s)
        k = fq.expansion_exponent(amax_s, amin_s, dtype, k_min)
        y = g.sign() * (mag / center[:, None]).pow(k[:, None])
        scale = (amax_s / center).pow(k) / fmax
        center = torch.where(nonzero, center, torch.zeros_like(center))
    else:
        k = torch.ones_like(amax)
        center = torch.where(nonzero, torch.ones_like(amax), torch.zeros_like(amax))
        y = g
        scale = torch.where(nonzero, amax / fmax, torch.ones_like(amax))
    q = (y / scale[:, None]).clamp(-fmax, fmax).to(dtype)
    return fq.GroupQuantized(q.reshape(-1)[: x.numel()], scale, center, k)


def _finite_inputs(seed: int) -> list[torch.Tensor]:
    """Finite tensors of the kinds optimizer states take: wide dynamic ranges, zeros, -0.0, all-zero and constant
    groups, subnormals, values near fp32's limits, a ragged last group."""
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(4096, generator=gen) * torch.exp2(torch.randint(-60, 30, (4096,), generator=gen).float())
    sparse = torch.randn(1000, generator=gen) * (torch.rand(1000, generator=gen) < 0.3)
    sparse[::7] = -0.0
    v = torch.randn(3, 517, generator=gen).square() * 1e-12  # second-moment-like, ragged
    edges = torch.tensor([0.0] * 128 + [2.5] * 128 + [1e-42, -3e-41, 1e-45, 7.0] * 32
                         + [3.0e38, -1.0e-38, 1.0, -2.0] * 32)
    return [wide, sparse, v, edges, torch.randn(7, generator=gen)]


@pytest.mark.parametrize("fmt", ["e4m3", "e5m2"])
@pytest.mark.parametrize("expand", [True, False])
@pytest.mark.parametrize("group_size", [128, 32])
def test_finite_inputs_bitwise_as_before(fmt: str, expand: bool, group_size: int) -> None:
    dtype = fq.fp8_dtype(fmt)
    for seed in range(3):
        for x in _finite_inputs(seed):
            assert torch.isfinite(x).all()
            old = _quantize_groups_979beb9(x, group_size, dtype, expand)
            new = fq.quantize_groups(x, group_size, dtype, expand)
            assert torch.equal(new.data.view(torch.uint8), old.data.view(torch.uint8))
            for name in ("scale", "center", "expand"):
                a, b = getattr(new, name), getattr(old, name)
                assert torch.equal(a.view(torch.int32), b.view(torch.int32)), name


def test_k_min_one_bitwise_as_before() -> None:
    """The expand-only variant (k_min=1) too."""
    x = _finite_inputs(7)[0]
    old = _quantize_groups_979beb9(x, 128, torch.float8_e4m3fn, True, 1.0)
    new = fq.quantize_groups(x, 128, torch.float8_e4m3fn, True, 1.0)
    assert torch.equal(new.data.view(torch.uint8), old.data.view(torch.uint8))
    assert torch.equal(new.scale.view(torch.int32), old.scale.view(torch.int32))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("compiled", [False, True])
def test_finite_inputs_bitwise_as_before_on_cuda(compiled: bool) -> None:
    """The same on the GPU, eager and compiled (inductor's Triton code for CoatAdamW's fused='compile' step; the
    extra selects must not change how the divisions and pows are generated). On CPU, inductor's C++ code for both
    versions was compared once by hand (identical codes and scales; ~36 s of compilation, too slow for this suite)."""
    old_fn, new_fn = _quantize_groups_979beb9, fq.quantize_groups
    if compiled:
        old_fn, new_fn = torch.compile(old_fn, dynamic=True), torch.compile(new_fn, dynamic=True)
    for expand in (True, False):
        for x in _finite_inputs(0):
            x = x.cuda()
            old, new = old_fn(x, 128, torch.float8_e4m3fn, expand), new_fn(x, 128, torch.float8_e4m3fn, expand)
            assert torch.equal(new.data.view(torch.uint8), old.data.view(torch.uint8)), (expand, x.numel())
            assert torch.equal(new.scale.view(torch.int32), old.scale.view(torch.int32))
