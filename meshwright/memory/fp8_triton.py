"""FP8 activation casts as Triton kernels: one pass over the input each, for the casts COAT's blocks run (#18).

Why: on an H200 the 1.3B's compiled COAT step spent 84.6 ms in FP8 casts against torchao's 30.7, enough to eat
everything its FP8 GEMMs saved (benchmarks/results/gpu_h200.md). Inductor's kernels of the quantisers ran at about a
fifth of memory bandwidth: a per-tensor cast with its transpose was three kernels (absmax, cast, transposed copy),
and a 1 x 16 group cast two, on dynamic shapes. Here a per-tensor cast is an absmax kernel (an atomic max) and one
kernel that writes the FP8 copy and its transpose from tiles; a group cast is one kernel.

The bits are the reference's (:mod:`meshwright.optim.fp8_quant`): the kernels do its arithmetic (a multiplication by
the scale's inverse, :func:`fp8_quant.activation_scales`, then round to nearest even), tested bit for bit under
Triton's interpreter on CPU and against torch on CUDA. The last step, fp32 -> FP8 code, is the GPU's own conversion
(cvt.rn.satfinite, ~1.4x faster per-tensor casts on an H200) where it agrees with the integer encoder: each compiled
variant is checked once, on its first real input (:func:`_checked`).
Compilers have got it wrong: from Triton 3.6's PTX, ptxas built the transposed copy of an fp32 tile from the input's
bits, not the conversion's (NaN gradients on an H200, 2026-11-28). GPUs before sm_89 have no FP8 conversion and always
take the encoder. The kernels live with CoatAdamW's (:mod:`meshwright.optim._coat_triton_kernels`, loaded per mode by
:func:`meshwright.optim.coat_triton.kernels`). :mod:`meshwright.memory.fp8_cast` sends contiguous CUDA tensors here
and everything else to its compiled quantisers.
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from meshwright.optim.coat_triton import KERNEL_FORMATS, kernels, triton_available
from meshwright.optim.fp8_quant import fp8_max

ENABLED = True  # set_enabled(False): inductor's quantisers instead, for comparison (benchmarks)
# fp32 -> FP8 codes: "checked", the GPU's cvt.rn.satfinite (_coat_triton_kernels._cvt_fp8) where a variant's first
# cast agrees with the integer encoder; "hardware", the GPU's always (benchmarks: to see its codes); "encoder", the
# integer encoder always (set_conversion)
CONVERSIONS = ("checked", "hardware", "encoder")
CONVERSION = "checked"
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AMAX_BLOCK = 8192
TILE = (64, 64)  # the transposing cast: a 64 x 64 tile per program
GROUP_TILE = (32, 128)  # the group cast: 32 rows x 8 groups of 16 per program
NUM_WARPS = 4
# per compiled variant (kernel, dtypes, what Triton specialises on): whether the GPU's conversion gave the integer
# encoder's codes on its first input
_HW_AGREES: dict[tuple, bool] = {}


def set_enabled(enabled: bool) -> None:
    """Run the casts here (True, the default) or through inductor's compiled quantisers (False)."""
    global ENABLED
    ENABLED = bool(enabled)


def runs(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, group: int | None = None) -> bool:
    """Whether the kernels here take ``x``: on, a contiguous non-empty CUDA tensor of a float dtype the kernels
    read, an FP8 format they write, and for group casts a last dimension that is a multiple of the group."""
    return (ENABLED and x.device.type == "cuda" and x.dtype in INPUT_DTYPES and dtype in KERNEL_FORMATS
            and x.numel() > 0 and x.dim() >= 1 and x.is_contiguous()
            and (group is None or (x.shape[-1] % group == 0 and group & (group - 1) == 0 and group <= 128))
            and triton_available())


def set_conversion(mode: str) -> str:
    """Choose how the kernels make FP8 codes (:data:`CONVERSIONS`); returns the mode it replaces."""
    global CONVERSION
    if mode not in CONVERSIONS:
        raise ValueError(f"conversion={mode!r} is invalid; valid: {', '.join(CONVERSIONS)}")
    old, CONVERSION = CONVERSION, mode
    return old


def _launch_args(x: torch.Tensor, dtype: torch.dtype) -> tuple[object, dict]:
    mbits, bias, _ = KERNEL_FORMATS[dtype]
    return kernels(x.device.type != "cuda"), dict(FMAX=fp8_max(dtype), MBITS=mbits, BIAS=bias)


def _variant(kernel: str, option: object, x: torch.Tensor, dtype: torch.dtype, rows: int, k: int) -> tuple:
    """What selects a compiled kernel: its name and option (transpose, group), the dtypes, and Triton's
    specialisations of the input pointer and the integer arguments (16-byte alignment, multiples of 16, 1)."""
    return (kernel, option, x.dtype, dtype, x.data_ptr() % 16 == 0, rows % 16 == 0, rows == 1, k % 16 == 0, k == 1)


def nan_codes(codes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Which of ``codes`` (FP8 bytes as uint8) are NaN in ``dtype``: 0x7f/0xff in E4M3, an all-ones exponent with a
    nonzero mantissa in E5M2 (0x7c/0xfc are its infinities)."""
    mag = codes & 0x7F
    return mag == 0x7F if dtype == torch.float8_e4m3fn else mag > 0x7C


def _same_codes(a: torch.Tensor, b: torch.Tensor) -> bool:
    """FP8 tensors with the same codes, a NaN code matching any NaN code (formats differ in which they write);
    other tensors (the scales) equal bit for bit."""
    if a.dtype not in KERNEL_FORMATS:
        return torch.equal(a, b)
    ua, ub = a.view(torch.uint8), b.view(torch.uint8)
    return bool(((ua == ub) | (nan_codes(ua, a.dtype) & nan_codes(ub, a.dtype))).all())


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _converts_fp8(device: torch.device) -> bool:
    """Whether the GPU has cvt to FP8 (compute capability 8.9: Ada, Hopper and later)."""
    return torch.cuda.get_device_capability(device) >= (8, 9)


def _checked(variant: tuple, device: torch.device, cast: Callable[[bool], tuple[torch.Tensor, ...]]
             ) -> tuple[torch.Tensor, ...]:
    """``cast(hw)`` with the GPU's FP8 conversion (hw=True) where this variant's first cast agreed with the integer
    encoder, else with the encoder. The first cast of a variant with a nonzero code runs both ways and compares (one
    host sync); a disagreement warns once and keeps the encoder for the variant. Under CUDA-graph capture an
    unchecked variant runs the encoder (no sync there). A GPU without FP8 conversion runs the encoder; a failure to
    build the conversion counts as a disagreement. CONVERSION "hardware" or "encoder" skips the check."""
    if CONVERSION != "checked" or device.type != "cuda":
        return cast(CONVERSION == "hardware" and device.type == "cuda")
    agrees = _HW_AGREES.get(variant)
    if agrees is not None:
        return cast(agrees)
    if _capturing() or not _converts_fp8(device):
        return cast(False)
    encoded = cast(False)
    if not any(((t.view(torch.uint8) & 0x7F) != 0).any() for t in encoded if t.dtype in KERNEL_FORMATS):
        return encoded  # only zeros to compare (a zero gradient, say): no verdict yet, the next cast decides
    try:
        hw = cast(True)
        agrees, why = all(_same_codes(a, b) for a, b in zip(hw, encoded)), "disagrees with the integer encoder"
    except Exception as e:  # noqa: BLE001 - a compiler refusing the inline PTX: the encoder serves
        hw, agrees, why = encoded, False, f"failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})"
    _HW_AGREES[variant] = agrees
    if not agrees:
        warnings.warn(f"the GPU's fp32 -> FP8 conversion in the Triton cast {variant[0]} ({variant[2]} -> "
                      f"{variant[3]}) {why} on its first input; that variant keeps the encoder "
                      "(see memory/fp8_triton.py)", RuntimeWarning, stacklevel=3)
    return hw if agrees else encoded


def quantize_per_tensor_t(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn, transpose: bool = True
                          ) -> tuple[torch.Tensor, ...]:
    """:func:`fp8_quant.quantize_per_tensor_t` of ``x`` flattened to (rows, last dim): (q, q^T, scale); with
    ``transpose=False``, (q, scale) with q of x's shape (:func:`fp8_quant.quantize_per_tensor`)."""
    k = x.shape[-1]
    rows = x.numel() // k
    module, consts = _launch_args(x, dtype)
    amax = torch.zeros((), dtype=torch.int32, device=x.device)
    module.cast_amax_kernel[(triton_cdiv(x.numel(), AMAX_BLOCK),)](x, amax, x.numel(), BLOCK=AMAX_BLOCK,
                                                                   num_warps=8)
    bm, bn = TILE

    def cast(hw: bool) -> tuple[torch.Tensor, ...]:
        q = torch.empty((rows, k), dtype=dtype, device=x.device)
        qt = torch.empty((k, rows) if transpose else (0,), dtype=dtype, device=x.device)
        scale = torch.empty((), dtype=torch.float32, device=x.device)
        module.cast_tensor_kernel[(triton_cdiv(rows, bm), triton_cdiv(k, bn))](
            x, q.view(torch.uint8), qt.view(torch.uint8), amax, scale, rows, k, TRANSPOSE=transpose, HW=hw,
            BLOCK_M=bm, BLOCK_N=bn, num_warps=NUM_WARPS, **consts)
        return q, qt, scale

    q, qt, scale = _checked(_variant("cast_tensor_kernel", transpose, x, dtype, rows, k), x.device, cast)
    if transpose:
        return q, qt, scale
    return q.view(x.shape), scale


def quantize_per_tensor(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_quant.quantize_per_tensor`: (FP8 copy of x's shape, fp32 scale)."""
    return quantize_per_tensor_t(x, dtype, transpose=False)


def quantize_last_dim_groups(x: torch.Tensor, group: int = 16, dtype: torch.dtype = torch.float8_e4m3fn
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`fp8_quant.quantize_last_dim_groups` for a last dimension that is a multiple of ``group``."""
    k = x.shape[-1]
    rows = x.numel() // k
    module, consts = _launch_args(x, dtype)
    bm, bn = GROUP_TILE
    bn = max(bn, group)

    def cast(hw: bool) -> tuple[torch.Tensor, ...]:
        q = torch.empty(x.shape, dtype=dtype, device=x.device)
        scale = torch.empty((*x.shape[:-1], k // group), dtype=torch.float32, device=x.device)
        module.cast_groups_kernel[(triton_cdiv(rows, bm), triton_cdiv(k, bn))](
            x, q.view(torch.uint8), scale, rows, k, GROUP=group, HW=hw, BLOCK_M=bm, BLOCK_N=bn,
            num_warps=NUM_WARPS, **consts)
        return q, scale

    q, scale = _checked(_variant("cast_groups_kernel", group, x, dtype, rows, k), x.device, cast)
    return q, scale


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
