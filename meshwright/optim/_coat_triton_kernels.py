"""The Triton kernel of CoatAdamW's step. Imports triton at the top: load it only through
:func:`meshwright.optim.coat_triton.kernels`, which executes this file once per mode (compiled for
CUDA, interpreted for CPU tensors), since Triton decides at decoration time whether to interpret.

One program owns ``BLOCK_G`` whole groups of one parameter: it reads the fp32 weight and gradient
and the FP8 moments with their group metadata, dequantises (COAT's range expansion inverted), runs
AdamW, writes the weight, then forms each group's new (scale, centre, exponent) and writes the moments
again as FP8. Which parameter and which groups a program owns come from a work table; parameters come
from a table of addresses, so one launch serves every parameter of a param group.

FP8 moments are read and written as bytes and encoded/decoded here with integer arithmetic
(round to nearest even, as torch's fp32 -> FP8 cast): independent of Triton's FP8 support, which the
interpreter lacks. The arithmetic follows the reference ops (:mod:`meshwright.optim.fp8_quant`,
``CoatAdamW``'s reference update) operation for operation, with IEEE division and square root and
no contraction into FMAs (the launcher passes ``enable_fp_fusion=False``), except the lerp, which
is an FMA as in torch's CPU and CUDA kernels.
"""

from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

ROW = tl.constexpr(11)  # per parameter in the pointer table: 10 addresses, then its numel


@triton.jit
def _pow(x, e, LIBDEVICE: tl.constexpr):
    """x ** e for x >= 0, e > 0: libdevice's powf on CUDA (what torch's CUDA pow calls); the
    interpreter has no libdevice, so there exp2(e log2 x) in float64 (then rounded to fp32)."""
    if LIBDEVICE:
        r = libdevice.pow(x, e)
    else:
        pos = x > 0
        xd = tl.where(pos, x, 1.0).to(tl.float64)
        r = tl.where(pos, tl.exp2(e.to(tl.float64) * tl.log2(xd)).to(tl.float32), 0.0)
    return r


@triton.jit
def _log2(x, LIBDEVICE: tl.constexpr):
    if LIBDEVICE:
        r = libdevice.log2(x)
    else:
        r = tl.log2(x)
    return r


@triton.jit
def _max2(a, b):
    return tl.maximum(a, b)


@triton.jit
def _min2(a, b):
    return tl.minimum(a, b)


@triton.jit
def _sign(x):
    return tl.where(x > 0, 1.0, tl.where(x < 0, -1.0, 0.0))


@triton.jit
def _decode(byte, MBITS: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr, E5M2: tl.constexpr):
    """FP8 bytes -> fp32, exactly torch's FP8 -> fp32 cast (e4m3fn: no inf, 0x7f NaN; e5m2: IEEE-like)."""
    b = byte.to(tl.int32)
    e = (b >> MBITS) & ((1 << (7 - MBITS)) - 1)
    mant = b & ((1 << MBITS) - 1)
    normal = (((e + (127 - BIAS)) << 23) | (mant << (23 - MBITS))).to(tl.float32, bitcast=True)
    mag = tl.where(e == 0, mant.to(tl.float32) * SUB, normal)
    if E5M2:
        mag = tl.where(e == 31, tl.where(mant == 0, float("inf"), float("nan")), mag)
    else:
        mag = tl.where((b & 127) == 127, float("nan"), mag)
    return tl.where(b >= 128, -mag, mag)


@triton.jit
def _encode(y, MBITS: tl.constexpr, BIAS: tl.constexpr):
    """fp32 (already clamped to +-fmax) -> FP8 bytes, rounding to nearest even like torch's cast."""
    bits = y.to(tl.int32, bitcast=True)
    sign = (bits >> 24) & 128
    a = bits & 0x7FFFFFFF
    SH: tl.constexpr = 23 - MBITS
    normal = ((a + ((1 << (SH - 1)) - 1) + ((a >> SH) & 1)) >> SH) - ((127 - BIAS) << MBITS)
    # below the smallest normal: the value in units of the smallest subnormal, rounded to nearest even
    e = (a >> 23) - 127
    mant = (a & 0x7FFFFF) | 0x800000
    s = tl.minimum(tl.maximum((24 - BIAS - MBITS) - e, 1), 31)
    sub = (mant + ((1 << (s - 1)) - 1) + ((mant >> s) & 1)) >> s
    code = tl.where(a >= ((128 - BIAS) << 23), normal, sub)
    code = tl.where(a > 0x7F800000, 127, code)  # NaN stays NaN
    return (code | sign).to(tl.uint8)


@triton.jit
def _dequant(byte, scale, center, expand, MBITS: tl.constexpr, BIAS: tl.constexpr, SUB: tl.constexpr,
             E5M2: tl.constexpr, LIBDEVICE: tl.constexpr):
    """sign(q) c (|q| s)^(1/k), as fp8_quant.dequantize_groups."""
    q = _decode(byte, MBITS, BIAS, SUB, E5M2)
    y = tl.abs(q) * scale[:, None]
    inv_k = tl.div_rn(tl.full(expand.shape, 1.0, tl.float32), expand)
    return _sign(q) * center[:, None] * _pow(y, tl.broadcast_to(inv_k[:, None], y.shape), LIBDEVICE)


@triton.jit
def _requant(x, k_min, target, FMAX: tl.constexpr, MBITS: tl.constexpr, BIAS: tl.constexpr,
             EXPAND: tl.constexpr, LIBDEVICE: tl.constexpr):
    """Per-row (group) statistics and FP8 codes, as fp8_quant.quantize_groups; x is 0 outside the tensor."""
    mag = tl.abs(x)
    # tl.reduce with own combines, not tl.max/tl.min: those are jit functions of triton's library,
    # decorated compiled when triton was imported, which the interpreter cannot call
    amax = tl.reduce(mag, 1, _max2)
    amin = tl.reduce(tl.where(mag > 0, mag, float("inf")), 1, _min2)
    nonzero = amax > 0
    if EXPAND:
        amax_s = tl.where(nonzero, amax, 1.0)
        amin_s = tl.where(nonzero, amin, 1.0)
        c = tl.sqrt_rn(amax_s) * tl.sqrt_rn(amin_s)
        ratio = _log2(tl.div_rn(amax_s, amin_s), LIBDEVICE)
        inv = tl.div_rn(tl.full(ratio.shape, 1.0, tl.float32), tl.maximum(ratio, 1e-30))
        k = tl.where(ratio > 0, tl.floor(inv * target * 16.0) * 0.0625, 1024.0)
        k = tl.minimum(tl.maximum(k, k_min), 1024.0)
        kk = tl.broadcast_to(k[:, None], x.shape)
        y = _sign(x) * _pow(tl.div_rn(mag, tl.broadcast_to(c[:, None], x.shape)), kk, LIBDEVICE)
        scale = tl.div_rn(_pow(tl.div_rn(amax_s, c), k, LIBDEVICE), tl.full(k.shape, FMAX, tl.float32))
        center = tl.where(nonzero, c, 0.0)
    else:
        k = tl.full(amax.shape, 1.0, tl.float32)
        center = tl.where(nonzero, 1.0, 0.0)
        y = x
        scale = tl.where(nonzero, tl.div_rn(amax, tl.full(amax.shape, FMAX, tl.float32)), 1.0)
    q = tl.div_rn(y, tl.broadcast_to(scale[:, None], x.shape))
    q = tl.where(q > FMAX, FMAX, tl.where(q < -FMAX, -FMAX, q))  # NaN passes, as torch.clamp
    return _encode(q, MBITS, BIAS), scale, center, k


@triton.jit
def coat_adamw_kernel(ptrs, work, decay, neg_step, bc2_sqrt, w1, beta2, c2, eps, k_min, m_target, v_target,
                      GROUP: tl.constexpr, GP2: tl.constexpr, BLOCK_G: tl.constexpr, EXPAND: tl.constexpr,
                      M_MBITS: tl.constexpr, M_BIAS: tl.constexpr, M_SUB: tl.constexpr, M_E5M2: tl.constexpr,
                      M_FMAX: tl.constexpr, V_MBITS: tl.constexpr, V_BIAS: tl.constexpr, V_SUB: tl.constexpr,
                      V_E5M2: tl.constexpr, V_FMAX: tl.constexpr, LIBDEVICE: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(work + 2 * pid).to(tl.int64)
    g0 = tl.load(work + 2 * pid + 1).to(tl.int64)
    row = ptrs + ROW * t
    p_ptr = tl.load(row).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(row + 1).to(tl.pointer_type(tl.float32))
    md_ptr = tl.load(row + 2).to(tl.pointer_type(tl.uint8))
    ms_ptr = tl.load(row + 3).to(tl.pointer_type(tl.float32))
    mc_ptr = tl.load(row + 4).to(tl.pointer_type(tl.float32))
    mk_ptr = tl.load(row + 5).to(tl.pointer_type(tl.float32))
    vd_ptr = tl.load(row + 6).to(tl.pointer_type(tl.uint8))
    vs_ptr = tl.load(row + 7).to(tl.pointer_type(tl.float32))
    vc_ptr = tl.load(row + 8).to(tl.pointer_type(tl.float32))
    vk_ptr = tl.load(row + 9).to(tl.pointer_type(tl.float32))
    n = tl.load(row + 10)

    groups = g0 + tl.arange(0, BLOCK_G).to(tl.int64)
    cols = tl.arange(0, GP2)
    offs = groups[:, None] * GROUP + cols[None, :]
    mask = (cols[None, :] < GROUP) & (offs < n)
    gmask = groups * GROUP < n

    p = tl.load(p_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    m = _dequant(tl.load(md_ptr + offs, mask=mask, other=0), tl.load(ms_ptr + groups, mask=gmask, other=1.0),
                 tl.load(mc_ptr + groups, mask=gmask, other=0.0), tl.load(mk_ptr + groups, mask=gmask, other=1.0),
                 M_MBITS, M_BIAS, M_SUB, M_E5M2, LIBDEVICE)
    v = _dequant(tl.load(vd_ptr + offs, mask=mask, other=0), tl.load(vs_ptr + groups, mask=gmask, other=1.0),
                 tl.load(vc_ptr + groups, mask=gmask, other=0.0), tl.load(vk_ptr + groups, mask=gmask, other=1.0),
                 V_MBITS, V_BIAS, V_SUB, V_E5M2, LIBDEVICE)

    # AdamW, in the reference's order: decay, lerp (an FMA, as torch's kernels), v*b2 + (1-b2)*g*g, addcdiv
    p = p * decay
    diff = g - m
    w = tl.full(m.shape, w1, tl.float32)
    m = tl.where(w1 < 0.5, tl.fma(w, diff, m), tl.fma(w - 1.0, diff, g))
    v = v * beta2 + c2 * g * g
    m = tl.where(mask, m, 0.0)
    v = tl.where(mask, v, 0.0)
    denom = tl.div_rn(tl.sqrt_rn(v), tl.full(v.shape, bc2_sqrt, tl.float32)) + eps
    p = p + tl.div_rn(neg_step * m, denom)
    tl.store(p_ptr + offs, p, mask=mask)

    mq, m_scale, m_center, m_k = _requant(m, k_min, m_target, M_FMAX, M_MBITS, M_BIAS, EXPAND, LIBDEVICE)
    tl.store(md_ptr + offs, mq, mask=mask)
    tl.store(ms_ptr + groups, m_scale, mask=gmask)
    tl.store(mc_ptr + groups, m_center, mask=gmask)
    tl.store(mk_ptr + groups, m_k, mask=gmask)
    vq, v_scale, v_center, v_k = _requant(v, k_min, v_target, V_FMAX, V_MBITS, V_BIAS, EXPAND, LIBDEVICE)
    tl.store(vd_ptr + offs, vq, mask=mask)
    tl.store(vs_ptr + groups, v_scale, mask=gmask)
    tl.store(vc_ptr + groups, v_center, mask=gmask)
    tl.store(vk_ptr + groups, v_k, mask=gmask)
