"""FP8 activation casts as Triton kernels: one pass over the input each, for the casts COAT's blocks run (#18).

Why: on an H200 the 1.3B's compiled COAT step spent 84.6 ms in FP8 casts against torchao's 30.7, enough to eat
everything its FP8 GEMMs saved (benchmarks/results/gpu_h200.md). Inductor's kernels of the quantisers ran at about a
fifth of memory bandwidth: a per-tensor cast with its transpose was three kernels (absmax, cast, transposed copy),
and a 1 x 16 group cast two, on dynamic shapes. Here a per-tensor cast is an absmax kernel (an atomic max) and one
kernel that writes the FP8 copy and its transpose from tiles; a group cast is one kernel.

The bits are the reference's (:mod:`meshwright.optim.fp8_quant`): the kernels do its arithmetic (IEEE division,
round to nearest even), tested bit for bit under Triton's interpreter on CPU and against torch on CUDA. The kernels
live with CoatAdamW's (:mod:`meshwright.optim._coat_triton_kernels`, loaded per mode by
:func:`meshwright.optim.coat_triton.kernels`). :mod:`meshwright.memory.fp8_cast` sends contiguous CUDA tensors here
and everything else to its compiled quantisers.
"""

from __future__ import annotations

import torch

from meshwright.optim.coat_triton import KERNEL_FORMATS, kernels, triton_available
from meshwright.optim.fp8_quant import fp8_max

ENABLED = True  # set_enabled(False): inductor's quantisers instead, for comparison (benchmarks)
# FP8 codes from the GPU's cvt.rn.satfinite instead of the integer encoder. Off: with it, on an H200 (Triton 3.6,
# 2026-11-28), COAT's FP8 linears computed NaN and a small llama's loss went NaN; the cause is not found (the PTX
# converts pairs in the right order). It made the per-tensor casts ~1.4x faster (bench_fp8_casts_gpu.py
# --hardware-conversion checks its codes against the reference)
HARDWARE_CONVERSION = False
INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
AMAX_BLOCK = 8192
TILE = (64, 64)  # the transposing cast: a 64 x 64 tile per program
GROUP_TILE = (32, 128)  # the group cast: 32 rows x 8 groups of 16 per program
NUM_WARPS = 4


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


def _launch_args(x: torch.Tensor, dtype: torch.dtype) -> tuple[object, dict]:
    mbits, bias, _ = KERNEL_FORMATS[dtype]
    interpret = x.device.type != "cuda"  # the interpreter has no FP8 conversion: the integer encoder there
    return kernels(interpret), dict(FMAX=fp8_max(dtype), MBITS=mbits, BIAS=bias,
                                    HW=HARDWARE_CONVERSION and not interpret)


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
    q = torch.empty((rows, k), dtype=dtype, device=x.device)
    qt = torch.empty((k, rows) if transpose else (0,), dtype=dtype, device=x.device)
    scale = torch.empty((), dtype=torch.float32, device=x.device)
    bm, bn = TILE
    module.cast_tensor_kernel[(triton_cdiv(rows, bm), triton_cdiv(k, bn))](
        x, q.view(torch.uint8), qt.view(torch.uint8), amax, scale, rows, k, TRANSPOSE=transpose,
        BLOCK_M=bm, BLOCK_N=bn, num_warps=NUM_WARPS, **consts)
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
    q = torch.empty(x.shape, dtype=dtype, device=x.device)
    scale = torch.empty((*x.shape[:-1], k // group), dtype=torch.float32, device=x.device)
    bm, bn = GROUP_TILE
    bn = max(bn, group)
    module.cast_groups_kernel[(triton_cdiv(rows, bm), triton_cdiv(k, bn))](
        x, q.view(torch.uint8), scale, rows, k, GROUP=group, BLOCK_M=bm, BLOCK_N=bn, num_warps=NUM_WARPS, **consts)
    return q, scale


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
