"""COAT's Triton kernels: CoatAdamW's step, and the FP8 activation casts (at the end). Imports triton at the
top: load it only through :func:`meshwright.optim.coat_triton.kernels`, which executes this file once per mode
(compiled for CUDA, interpreted for CPU tensors), since Triton decides at decoration time whether to interpret.

One program owns ``BLOCK_G`` whole groups of one parameter: it reads the fp32 weight and gradient
and the FP8 moments with their group metadata, dequantises (COAT's range expansion inverted), runs
AdamW, writes the weight, then forms each group's new (scale, centre, exponent) and writes the moments
again as FP8. Which parameter and which groups a program owns come from a work table; parameters come
from a table of offsets from one base tensor per dtype, so one launch serves a whole param group.

FP8 moments are read and written as bytes and encoded/decoded here with integer arithmetic (round to
nearest even, as torch's fp32 -> FP8 cast): independent of Triton's FP8 support, which the interpreter
lacks. The arithmetic follows the reference ops (:mod:`meshwright.optim.fp8_quant`, ``CoatAdamW``'s
reference update) operation for operation, with no contraction into FMAs (the launcher passes
``enable_fp_fusion=False``) except the lerp, an FMA as in torch's CPU and CUDA kernels.

``MATH`` picks the per-element pow, division and square root: 0 interpreter (IEEE, pow in float64),
1 precise (IEEE, libdevice powf as torch's CUDA pow), 2 fast (the hardware's approximate exp2/log2,
reciprocals: the precise pow costs ~100 instructions, four per element, which makes the kernel
compute-bound on an H100/H200), 3 the fast mode's code paths under the interpreter (tests).
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from meshwright.optim.fp8_quant import AMAX_FLOOR as _AMAX_FLOOR

ROW = tl.constexpr(11)  # per parameter in the table: 10 tensor offsets, then its numel


@triton.jit
def _lg2_approx(x):
    """The hardware's log2 (MUFU.LG2, ~2^-22 absolute error); tl.log2 would call libdevice's log2f."""
    return tl.inline_asm_elementwise("lg2.approx.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _pow(x, e, MATH: tl.constexpr):
    """x ** e for x >= 0, e > 0. MATH 0 (interpreter): exp2(e log2 x) in float64, then rounded (libdevice
    is absent there); 1 (precise): libdevice's powf, what torch's CUDA pow calls; 2 (fast): the
    hardware's approximate exp2/log2 in fp32 (lg2(0) = -inf, so 0 maps to 0)."""
    if MATH == 1:
        r = libdevice.pow(x, e)
    elif MATH >= 2:
        r = tl.exp2(e * _log2(x, MATH))
    else:
        pos = x > 0
        xd = tl.where(pos, x, 1.0).to(tl.float64)
        # 0 -> 0, NaN -> NaN (as powf and the fast path do: a NaN moment stays NaN, as in the reference)
        r = tl.where(pos, tl.exp2(e.to(tl.float64) * tl.log2(xd)).to(tl.float32), tl.where(x == 0, 0.0, x))
    return r


@triton.jit
def _log2(x, MATH: tl.constexpr):
    if MATH == 1:
        r = libdevice.log2(x)
    elif MATH == 2:
        r = _lg2_approx(x)
    else:  # 0, and 3: the fast mode's code paths in the interpreter (IEEE log2, no inline assembly there)
        r = tl.log2(x)
    return r


@triton.jit
def _div(a, b, MATH: tl.constexpr):
    """IEEE division as torch's, except in fast mode (Triton's '/', within 2 ulp)."""
    if MATH >= 2:
        r = a / b
    else:
        r = tl.div_rn(a, b)
    return r


@triton.jit
def _sqrt(x, MATH: tl.constexpr):
    if MATH >= 2:
        r = tl.sqrt(x)
    else:
        r = tl.sqrt_rn(x)
    return r


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


# triton's own combines where they exist: the interpreter recognises them and reduces with numpy
# (our own would run its slow element-by-element path); compiled, both are the same max/min
_MAX = getattr(tl.standard, "_elementwise_max", _max2)
_MIN = getattr(tl.standard, "_elementwise_min", _min2)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _decode(byte, MBITS: tl.constexpr, BIAS: tl.constexpr, E5M2: tl.constexpr):
    """FP8 bytes -> fp32, exactly torch's FP8 -> fp32 cast (e4m3fn: no inf, 0x7f NaN; e5m2: IEEE-like).

    The magnitude bits shifted into fp32's place read as fp32 2^(BIAS-127) times the value (FP8
    subnormals land on fp32 subnormals), so one exact multiplication by 2^(127-BIAS) finishes it."""
    b = byte.to(tl.int32)
    mag = ((b & 127) << (23 - MBITS)).to(tl.float32, bitcast=True) * (2.0 ** (127 - BIAS))
    if E5M2:
        mag = tl.where((b & 124) == 124, tl.where((b & 3) == 0, float("inf"), float("nan")), mag)
    else:
        mag = tl.where((b & 127) == 127, float("nan"), mag)
    # the sign as a bit, not by negation: triton lowers -x to 0 - x in some versions (3.6: -0.0 decoded as +0.0)
    return (mag.to(tl.int32, bitcast=True) | ((b & 128) << 24)).to(tl.float32, bitcast=True)


@triton.jit
def _encode(y, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """fp32 (already clamped to +-fmax) -> FP8 bytes, rounding to nearest even: torch's (c10's) cast,
    step for step (normal range in integers, subnormals by adding a power of two in fp32)."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 128
    a = bits & 0x7FFFFFFF
    SH: tl.constexpr = 23 - MBITS
    normal = (a + (((BIAS - 127) << 23) + (1 << (SH - 1)) - 1) + ((a >> SH) & 1)) >> SH
    # add 2^(SH - BIAS + 1), whose fp32 ulp is FP8's smallest subnormal, then take its bits away again
    MAGIC: tl.constexpr = (127 + SH - BIAS + 1) << 23
    MAGIC_F: tl.constexpr = 2.0 ** (SH - BIAS + 1)
    sub = (a.to(tl.float32, bitcast=True) + MAGIC_F).to(tl.int32, bitcast=True) - MAGIC
    code = tl.where(a >= ((128 - BIAS) << 23), normal, sub)
    code = tl.where(a > 0x7F800000, 127, code)  # NaN stays NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _dequant(byte, scale, center, expand, MBITS: tl.constexpr, BIAS: tl.constexpr, E5M2: tl.constexpr,
             MATH: tl.constexpr):
    """sign(q) c (|q| s)^(1/k), as fp8_quant.dequantize_groups."""
    q = _decode(byte, MBITS, BIAS, E5M2)
    y = tl.abs(q) * scale[:, None]
    inv_k = _div(tl.full(expand.shape, 1.0, tl.float32), expand, MATH)
    r = _pow(y, tl.broadcast_to(inv_k[:, None], y.shape), MATH)
    if MATH >= 2:  # fast: a select instead of sign() and a multiplication (differs only in the sign of 0)
        r = r * center[:, None]
        r = tl.where(q < 0, -r, r)
    else:
        r = _sign(q) * center[:, None] * r
    return r


@triton.jit
def _requant(x, k_min, target, FMAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
             EXPAND: tl.constexpr, MATH: tl.constexpr):
    """Per-row (group) statistics and FP8 codes, as fp8_quant.quantize_groups; x is 0 outside the tensor.
    A non-finite value is left out of the statistics and stored as NaN (poisons only its element): its
    magnitude is made NaN, which the max and min below skip (CUDA's max.f32/min.f32, the interpreter's
    nanmax/nanmin) and every later operation keeps, so the code is NaN with one select per element."""
    mag = tl.abs(x)
    mag = tl.where(mag < float("inf"), mag, float("nan"))
    # tl.reduce, not tl.max/tl.min: those are jit functions of triton's library, decorated compiled when
    # triton was imported, which the interpreter cannot call
    amax = tl.reduce(mag, 1, _MAX)
    amin = tl.reduce(tl.where(mag > 0, mag, float("inf")), 1, _MIN)
    nonzero = amax > 0
    if EXPAND:
        amax_s = tl.where(nonzero, amax, 1.0)
        amin_s = tl.where(nonzero, amin, 1.0)
        c = _sqrt(amax_s, MATH) * _sqrt(amin_s, MATH)
        ratio = _log2(_div(amax_s, amin_s, MATH), MATH)
        inv = _div(tl.full(ratio.shape, 1.0, tl.float32), tl.maximum(ratio, 1e-30), MATH)
        k = tl.where(ratio > 0, tl.floor(inv * target * 16.0) * 0.0625, 1024.0)
        k = tl.minimum(tl.maximum(k, k_min), 1024.0)
        kk = tl.broadcast_to(k[:, None], x.shape)
        if MATH >= 2:  # fast: one reciprocal per group, a multiplication per element
            inv_c = 1.0 / c
            y = _pow(mag * inv_c[:, None], kk, MATH)
            y = tl.where(x < 0, -y, y)
        else:
            y = _sign(x) * _pow(_div(mag, tl.broadcast_to(c[:, None], x.shape), MATH), kk, MATH)
        scale = _div(_pow(_div(amax_s, c, MATH), k, MATH), tl.full(k.shape, FMAX, tl.float32), MATH)
        center = tl.where(nonzero, c, 0.0)
    else:
        k = tl.full(amax.shape, 1.0, tl.float32)
        center = tl.where(nonzero, 1.0, 0.0)
        y = tl.where(mag == mag, x, float("nan"))  # an inf would clamp to FMAX
        scale = tl.where(nonzero, _div(amax, tl.full(amax.shape, FMAX, tl.float32), MATH), 1.0)
    if MATH >= 2:
        inv_s = 1.0 / scale
        q = y * inv_s[:, None]
    else:
        q = _div(y, tl.broadcast_to(scale[:, None], x.shape), MATH)
    q = tl.where(q > FMAX, FMAX, tl.where(q < -FMAX, -FMAX, q))  # NaN passes, as torch.clamp
    return _encode(q, MBITS, BIAS), scale, center, k


@triton.jit
def _at(base, row, i, ALIGN: tl.constexpr):
    """``base`` moved by entry ``i`` of the table (an element offset: tensors lie anywhere, the table
    holds their distances from one base tensor of their dtype). ALIGN > 0: the launcher checked that
    every address is a multiple of 16 bytes, so the offset is one of ALIGN elements, which lets Triton
    move 16 bytes per load and store."""
    off = tl.load(row + i)
    if ALIGN > 0:
        off = tl.multiple_of(off, ALIGN)
    return base + off


@triton.jit
def coat_adamw_kernel(base32, base8, ptrs, work, decay, neg_step, bc2_sqrt, w1, beta2, c2, eps, k_min, m_target, v_target,
                      GROUP: tl.constexpr, GP2: tl.constexpr, BLOCK_G: tl.constexpr, EXPAND: tl.constexpr,
                      M_MBITS: tl.constexpr, M_BIAS: tl.constexpr, M_E5M2: tl.constexpr,
                      M_FMAX: tl.constexpr, V_MBITS: tl.constexpr, V_BIAS: tl.constexpr,
                      V_E5M2: tl.constexpr, V_FMAX: tl.constexpr, MATH: tl.constexpr, ALIGNED: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid).to(tl.int64)
    g0 = tl.load(work + 2 * pid + 1).to(tl.int64)
    row = ptrs + ROW * t
    p_ptr = _at(base32, row, 0, 4 * ALIGNED)
    g_ptr = _at(base32, row, 1, 4 * ALIGNED)
    md_ptr = _at(base8, row, 2, 16 * ALIGNED)
    ms_ptr = _at(base32, row, 3, 4 * ALIGNED)
    mc_ptr = _at(base32, row, 4, 4 * ALIGNED)
    mk_ptr = _at(base32, row, 5, 4 * ALIGNED)
    vd_ptr = _at(base8, row, 6, 16 * ALIGNED)
    vs_ptr = _at(base32, row, 7, 4 * ALIGNED)
    vc_ptr = _at(base32, row, 8, 4 * ALIGNED)
    vk_ptr = _at(base32, row, 9, 4 * ALIGNED)
    n = tl.load(row + 10)
    if ALIGNED:  # the launcher checked: every numel a multiple of 4, so masks come in runs of 4
        n = tl.multiple_of(n, 4)

    groups = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
    cols = tl.arange(0, GP2)
    offs = groups[:, None] * GROUP + cols[None, :]
    mask = (cols[None, :] < GROUP) & (offs < n)
    gmask = groups * GROUP < n

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = _dequant(tl.load(md_ptr + offs, mask=mask, other=0), tl.load(ms_ptr + groups, mask=gmask, other=1.0),
                 tl.load(mc_ptr + groups, mask=gmask, other=0.0), tl.load(mk_ptr + groups, mask=gmask, other=1.0),
                 M_MBITS, M_BIAS, M_E5M2, MATH)
    v = _dequant(tl.load(vd_ptr + offs, mask=mask, other=0), tl.load(vs_ptr + groups, mask=gmask, other=1.0),
                 tl.load(vc_ptr + groups, mask=gmask, other=0.0), tl.load(vk_ptr + groups, mask=gmask, other=1.0),
                 V_MBITS, V_BIAS, V_E5M2, MATH)

    # AdamW, in the reference's order: decay, lerp (an FMA, as torch's kernels), v*b2 + (1-b2)*g*g, addcdiv
    p = p * decay
    diff = g - m
    w = tl.full(m.shape, w1, tl.float32)
    m = tl.where(w1 < 0.5, tl.fma(w, diff, m), tl.fma(w - 1.0, diff, g))
    v = v * beta2 + c2 * g * g
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    denom = _div(_sqrt(v, MATH), tl.full(v.shape, bc2_sqrt, tl.float32), MATH) + eps
    p = p + _div(neg_step * m, denom, MATH)
    tl.store(p_ptr + offs, p, mask=mask)

    mq, m_scale, m_center, m_k = _requant(m, k_min, m_target, M_FMAX, M_MBITS, M_BIAS, EXPAND, MATH)
    tl.store(md_ptr + offs, mq, mask=mask)
    tl.store(ms_ptr + groups, m_scale, mask=gmask)
    tl.store(mc_ptr + groups, m_center, mask=gmask)
    tl.store(mk_ptr + groups, m_k, mask=gmask)
    vq, v_scale, v_center, v_k = _requant(v, k_min, v_target, V_FMAX, V_MBITS, V_BIAS, EXPAND, MATH)
    tl.store(vd_ptr + offs, vq, mask=mask)
    tl.store(vs_ptr + groups, v_scale, mask=gmask)
    tl.store(vc_ptr + groups, v_center, mask=gmask)
    tl.store(vk_ptr + groups, v_k, mask=gmask)


@triton.jit
def fp8_codec_kernel(x_ptr, code_ptr, byte_ptr, y_ptr, n, MBITS: tl.constexpr, BIAS: tl.constexpr,
                     E5M2: tl.constexpr, BLOCK: tl.constexpr):
    """The kernel's FP8 encoder and decoder alone (tests compare them with torch's casts, every code)."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(code_ptr + offs, _encode(tl.load(x_ptr + offs, mask=mask, other=0.0), MBITS, BIAS), mask=mask)
    tl.store(y_ptr + offs, _decode(tl.load(byte_ptr + offs, mask=mask, other=0), MBITS, BIAS, E5M2), mask=mask)


# ---- FP8 activation casts (meshwright/memory/fp8_triton.py launches them) -------------------------------------------
# Each is one pass over its input at memory bandwidth: inductor's kernels of the same quantisers ran at a fifth of it
# on an H200 (dynamic shapes, three kernels for a cast with its transpose). The arithmetic is the reference's
# (fp8_quant.quantize_per_tensor / quantize_last_dim_groups): the absmax in fp32, the scale amax / FMAX and its inverse
# FMAX / amax (1 where the absmax is not positive, NaN included; fp8_quant.activation_scales), a multiplication by
# the inverse, clamp, round to nearest even: the integer encoder above (as
# CoatAdamW's) or, with HW, the GPU's conversion (_cvt_fp8; fp8_triton checks it against the encoder). Magnitudes
# are compared as the integers of their fp32 bits (sign cleared): the same order as the floats for every non-negative
# value, with a NaN above +inf, so a NaN wins a max as torch's amax lets it, and an atomic max works on one int32 word.


@triton.jit
def _magnitude_bits(x):
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


def _cvt_asm(fmt: str) -> tl.constexpr:
    return tl.constexpr(f"{{ .reg .b16 t; cvt.rn.satfinite.{fmt}x2.f32 t, 0f00000000, $1; cvt.u32.u16 $0, t; }}")


_CVT_E4M3, _CVT_E5M2 = _cvt_asm("e4m3"), _cvt_asm("e5m2")


@triton.jit
def _cvt_fp8(q, MBITS: tl.constexpr):
    """Clamped fp32 -> FP8 byte by the GPU's cvt.rn.satfinite (sm_89+), one element per instruction, paired with
    0.0 so the code is the low byte of a register whose high byte is 0. Why not Triton's ``q.to(tl.float8e4nv)``:
    it converts pairs and splits each 16-bit result into bytes (shr.u16 by 8), and for the transposed copy of an
    fp32 input ptxas compiled that split from the fp32 *input* register instead of the conversion's result (SASS of
    cast_tensor_kernel for sm_90 from Triton 3.6's PTX, read at stop 40; ptxas 12.8 and 12.9 alike at -O1 and above,
    right at -O0): garbage bytes, some of them NaN codes, in q^T only (benchmarks/sass_audit.py)."""
    r = tl.inline_asm_elementwise(_CVT_E5M2 if MBITS == 2 else _CVT_E4M3, "=r,r", [q], dtype=tl.int32, is_pure=True,
                                  pack=1)
    return r.to(tl.uint8)


AMAX_FLOOR = tl.constexpr(_AMAX_FLOOR)


@triton.jit
def _scales(amax, FMAX: tl.constexpr):
    """fp8_quant.activation_scales: (amax / FMAX, FMAX / amax), correctly rounded, from the absmax taken at
    AMAX_FLOOR at least; (1, 1) where the absmax is not positive (NaN included)."""
    a = tl.where(amax > AMAX_FLOOR, amax, AMAX_FLOOR)
    fmax = tl.full(a.shape, FMAX, tl.float32)
    positive = amax > 0
    return tl.where(positive, tl.div_rn(a, fmax), 1.0), tl.where(positive, tl.div_rn(fmax, a), 1.0)


@triton.jit
def _scaled_fp8(x, inverse, FMAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr, HW: tl.constexpr):
    q = x * inverse  # one IEEE multiplication, as the reference: no division sequence per element
    q = tl.where(q > FMAX, FMAX, tl.where(q < -FMAX, -FMAX, q))  # NaN passes, as torch.clamp
    if HW:  # the GPU's cvt.rn.satfinite (fp8_triton.CONVERSION: checked against the encoder once per variant)
        code = _cvt_fp8(q, MBITS)
    else:
        code = _encode(q, MBITS, BIAS)
    return code


@triton.jit
def cast_amax_kernel(x_ptr, amax_ptr, n, BLOCK: tl.constexpr):
    """amax_ptr (one int32, zeroed) <- max over x of the magnitude bits."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    bits = _magnitude_bits(tl.load(x_ptr + offs, mask=offs < n, other=0.0))
    tl.atomic_max(amax_ptr, tl.reduce(bits, 0, _MAX))


@triton.jit
def cast_tensor_kernel(x_ptr, q_ptr, qt_ptr, amax_ptr, scale_ptr, M, N, FMAX: tl.constexpr, MBITS: tl.constexpr,
                       BIAS: tl.constexpr, HW: tl.constexpr, TRANSPOSE: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """x (M, N) row-major -> FP8 bytes q (M, N) and, with TRANSPOSE, q^T (N, M), with the tensor's one scale.

    The transposed copy must come from the codes. Triton 3.6 instead moved a 16-bit input tile into the transposed
    layout (a transposing shared-memory load) and ran the whole conversion again there: 64 conversions per thread
    for 32 elements, 28.6 instructions per element against 19.0 (SASS for sm_90, benchmarks/sass_audit.py). An
    identity it cannot see through (a split into column pairs, joined back) keeps one conversion; Triton 3.9
    converts once either way and folds the identity away."""
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    amax = tl.load(amax_ptr).to(tl.float32, bitcast=True)
    scale, inverse = _scales(amax, FMAX)
    code = _scaled_fp8(x, inverse, FMAX, MBITS, BIAS, HW)
    if TRANSPOSE:  # an identity (split into column pairs, joined back) that keeps Triton 3.6 from converting twice
        lo, hi = tl.split(tl.reshape(code, (BLOCK_M, BLOCK_N // 2, 2)))
        code = tl.reshape(tl.join(lo, hi), (BLOCK_M, BLOCK_N))
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], code, mask=mask)
    if TRANSPOSE:
        tl.store(qt_ptr + cols[:, None] * M + rows[None, :], tl.trans(code), mask=tl.trans(mask))
    if (tl.program_id(0) == 0) & (tl.program_id(1) == 0):
        tl.store(scale_ptr, scale)


@triton.jit
def cast_groups_kernel(x_ptr, q_ptr, s_ptr, M, N, GROUP: tl.constexpr, FMAX: tl.constexpr, MBITS: tl.constexpr,
                       BIAS: tl.constexpr, HW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """x (M, N) row-major, N a multiple of GROUP -> FP8 bytes q (M, N) and fp32 scales (M, N / GROUP), one per
    1 x GROUP group along a row."""
    G: tl.constexpr = BLOCK_N // GROUP
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    x = tl.load(x_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    xg = tl.reshape(x, (BLOCK_M, G, GROUP))
    amax = tl.reduce(_magnitude_bits(xg), 2, _MAX).to(tl.float32, bitcast=True)
    scale, inverse = _scales(amax, FMAX)
    code = tl.reshape(_scaled_fp8(xg, inverse[:, :, None], FMAX, MBITS, BIAS, HW), (BLOCK_M, BLOCK_N))
    tl.store(q_ptr + rows[:, None] * N + cols[None, :], code, mask=mask)
    gcols = tl.program_id(1).to(tl.int64) * G + tl.arange(0, G)
    tl.store(s_ptr + rows[:, None] * (N // GROUP) + gcols[None, :], scale,
             mask=(rows[:, None] < M) & (gcols[None, :] < N // GROUP))
