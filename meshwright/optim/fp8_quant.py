"""Group-wise FP8 quantization with COAT's dynamic range expansion (shared by CoatAdamW and tests).

Why: optimizer states span far more decades inside a group of 128 than FP8's ~2^17 range can hold with
plain absmax scaling, so small second moments flush to zero and m/sqrt(v) blows up. COAT (Xi et al.,
2024) maps each group through f(x) = sign(x) (|x|/c)^k before scaling, with c = sqrt(max*min) over the
group's non-zero magnitudes and k the largest multiple of 1/16 with (max/min)^k <= fmax^2/2, so the
group's range fills the format. Dequantization inverts it: x = sign(q) c (|q| s)^(1/k).

Everything here is plain torch (CPU or GPU); FP8 is a storage format, the arithmetic is fp32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from meshwright.errors import invalid
from meshwright.optim.coat_bytes import groups_of  # noqa: F401  (torch-free, shared with the planner)

FP8_FORMATS: dict[str, torch.dtype] = {"e4m3": torch.float8_e4m3fn, "e5m2": torch.float8_e5m2}
EXPAND_STEP = 16  # k is rounded down to a multiple of 1/EXPAND_STEP (COAT's kernel uses 16)
K_MAX = 1024.0  # beyond ~2^10 the fp32 pow error dominates the FP8 rounding it would remove
K_MIN = 1.0 / EXPAND_STEP  # k < 1 compresses a group wider than FP8 (as COAT's kernel does) instead of flushing


def fp8_dtype(name: str | torch.dtype) -> torch.dtype:
    """'e4m3'/'e5m2' (or the torch dtype itself) -> the torch FP8 dtype; one-line error otherwise."""
    if isinstance(name, torch.dtype):
        if name in FP8_FORMATS.values():
            return name
    elif name in FP8_FORMATS:
        return FP8_FORMATS[name]
    raise invalid("fp8_format", name, "'e4m3' or 'e5m2'")


def fp8_max(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).max)


@dataclass
class GroupQuantized:
    """An FP8 tensor of ``numel`` elements with one (scale, centre, exponent) triple per group."""

    data: torch.Tensor  # flat FP8, numel elements (not padded)
    scale: torch.Tensor  # fp32 (groups,)
    center: torch.Tensor  # fp32 (groups,)  c; 0 for an all-zero group
    expand: torch.Tensor  # fp32 (groups,)  k >= 1 (exactly 1 without expansion)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scale, self.center, self.expand))


def _grouped(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Flatten to fp32 and pad with zeros to (groups, group_size); zeros never affect max/min-non-zero."""
    flat = x.detach().reshape(-1).float()
    pad = (-flat.numel()) % group_size
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, group_size)


def expansion_exponent(amax: torch.Tensor, amin: torch.Tensor, dtype: torch.dtype, k_min: float = K_MIN) -> torch.Tensor:
    """COAT's k = floor(16 log2(fmax^2/2) / log2(max/min)) / 16, clamped to [k_min, K_MAX].

    k > 1 expands a narrow group to use FP8's range (the paper's point: fewer rounding errors).
    k < 1 compresses a group wider than FP8's range so its small values do not flush to zero; COAT's
    CUDA kernel does this too (it does not clamp k). Flushing matters: a second moment flushed to zero
    under a non-zero first moment turns the update into m/eps (we measured embedding rows jumping by 3.0
    after 3 steps with ``k_min=1``). ``k_min=1`` gives the expand-only variant. Constant groups
    (max == min) get K_MAX, where every value maps to exactly 1.
    """
    target = math.log2(fp8_max(dtype) ** 2 / 2)
    ratio = torch.log2(amax / amin)
    k = torch.where(ratio > 0, torch.floor(target / ratio.clamp_min(1e-30) * EXPAND_STEP) / EXPAND_STEP,
                    torch.full_like(ratio, K_MAX))
    return k.clamp(k_min, K_MAX)


def quantize_groups(x: torch.Tensor, group_size: int = 128, dtype: torch.dtype = torch.float8_e4m3fn,
                    expand: bool = True, k_min: float = K_MIN) -> GroupQuantized:
    """Quantize ``x`` (any shape) group-wise along its flattened elements.

    ``expand=False`` is naive per-group absmax scaling (k = 1, c = 1), the baseline COAT improves on.
    A non-finite value is stored as NaN and left out of its group's statistics, so it poisons only its own
    element, as in fp32 AdamW (in the statistics, a NaN read the whole group as zero, an inf made every code of
    the group NaN: both for every later step, as the stored NaN stays).
    """
    g = _grouped(x, group_size)
    finite = g.isfinite()
    g = torch.where(finite, g, torch.zeros_like(g))
    mag = g.abs()
    amax = mag.amax(dim=1)
    nonzero = amax > 0
    fmax = fp8_max(dtype)
    if expand:
        amin = torch.where(mag > 0, mag, torch.full_like(mag, float("inf"))).amin(dim=1)
        amax_s = torch.where(nonzero, amax, torch.ones_like(amax))
        amin_s = torch.where(nonzero, amin, torch.ones_like(amin))
        center = torch.sqrt(amax_s) * torch.sqrt(amin_s)  # sqrt(max*min) without fp32 overflow/underflow
        k = expansion_exponent(amax_s, amin_s, dtype, k_min)
        y = g.sign() * (mag / center[:, None]).pow(k[:, None])
        scale = (amax_s / center).pow(k) / fmax
        center = torch.where(nonzero, center, torch.zeros_like(center))
    else:
        k = torch.ones_like(amax)
        center = torch.where(nonzero, torch.ones_like(amax), torch.zeros_like(amax))
        y = g
        scale = torch.where(nonzero, amax / fmax, torch.ones_like(amax))
    q = (y / scale[:, None]).clamp(-fmax, fmax)  # clamp: e4m3fn has no inf, overflow would be NaN
    q = torch.where(finite, q, torch.full_like(q, float("nan"))).to(dtype)
    return GroupQuantized(q.reshape(-1)[: x.numel()], scale, center, k)


def dequantize_groups(gq: GroupQuantized, shape: torch.Size | tuple[int, ...] | None = None,
                      group_size: int = 128) -> torch.Tensor:
    """Inverse of :func:`quantize_groups`: sign(q) c (|q| s)^(1/k) in fp32, reshaped to ``shape``."""
    n = gq.data.numel()
    q = _grouped(gq.data.float(), group_size)
    y = q.abs() * gq.scale[:, None]
    x = q.sign() * gq.center[:, None] * y.pow(1.0 / gq.expand[:, None])
    x = x.reshape(-1)[:n]
    return x.view(shape) if shape is not None else x


# ---- per-tensor and 1 x G (along the last dim) scaling, for activations -----------------------------
# An absmax below AMAX_FLOOR is taken at the floor: fmax / amax must stay finite (0 * inf would make a zero's code NaN).
# Values under 2^-110 are far below anything FP8 keeps next to a larger one; E5M2's FMAX / floor is 1.75 * 2^125.
AMAX_FLOOR = 2.0 ** -110


def activation_scales(amax: torch.Tensor, fmax: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, inverse) of an fp32 absmax: the scale ``amax / fmax`` that dequantises (x ~ q * scale) and the
    ``fmax / amax`` the values are multiplied by, each correctly rounded from ``amax`` (1 and 1 where the absmax is
    not positive, NaN included). Why multiply, not divide by the scale: one IEEE multiplication per element gives
    the same bits on every backend (eager CPU and CUDA, inductor, the Triton kernels of memory/fp8_triton.py, which
    it spares a division sequence per element: a third to a half of their instructions). A division would not:
    torch's CUDA kernels divide by a Python number through its reciprocal, and inductor's division is not IEEE's."""
    positive = amax > 0
    a = amax.clamp_min(AMAX_FLOOR)
    fmax_t = torch.full_like(a, fmax)
    one = torch.ones_like(a)
    return torch.where(positive, a / fmax_t, one), torch.where(positive, fmax_t / a, one)


def quantize_per_tensor(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """One absmax scale for the whole tensor (COAT's choice for inputs of linear layers)."""
    fmax = fp8_max(dtype)
    scale, inverse = activation_scales(x.detach().abs().amax().float(), fmax)
    q = (x.detach().float() * inverse).clamp(-fmax, fmax).to(dtype)
    return q, scale


def quantize_per_tensor_t(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_per_tensor` of ``x`` flattened to 2-D (rows, last dim), plus the transposed copy.

    Why: ``torch._scaled_mm`` takes a row-major first and a column-major second operand, so the weight
    gradient (g^T x) needs g^T and x^T materialised and the input gradient (g W) needs W^T. Writing them
    next to the cast (one compiled kernel on GPUs, from the FP8 copy: 1 byte read per element) replaces
    an eager strided copy of the FP8 tensor in the backward. Returns (q (rows, k), q^T (k, rows)
    contiguous, scale); the bits are those of :func:`quantize_per_tensor`.
    """
    q, scale = quantize_per_tensor(x.reshape(-1, x.shape[-1]), dtype)
    return q, q.t().contiguous(), scale


def dequantize_per_tensor(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale).to(dtype)


def quantize_last_dim_groups(x: torch.Tensor, group: int = 16, dtype: torch.dtype = torch.float8_e4m3fn
                             ) -> tuple[torch.Tensor, torch.Tensor]:
    """1 x ``group`` absmax scaling along the last (hidden) dim: outlier channels only hurt their group.

    Returns (FP8 tensor of x's shape, fp32 scales of shape (..., ceil(hidden/group))).
    """
    hidden = x.shape[-1]
    pad = (-hidden) % group
    xf = x.detach().float()
    if pad:
        xf = torch.nn.functional.pad(xf, (0, pad))
    g = xf.unflatten(-1, (-1, group))
    fmax = fp8_max(dtype)
    scale, inverse = activation_scales(g.abs().amax(dim=-1, keepdim=True), fmax)
    q = (g * inverse).clamp(-fmax, fmax).to(dtype).flatten(-2)[..., :hidden]
    return q.contiguous(), scale.squeeze(-1)


def dequantize_last_dim_groups(q: torch.Tensor, scale: torch.Tensor, group: int = 16,
                               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    hidden = q.shape[-1]
    pad = (-hidden) % group
    qf = q.float()
    if pad:
        qf = torch.nn.functional.pad(qf, (0, pad))
    x = (qf.unflatten(-1, (-1, group)) * scale.unsqueeze(-1)).flatten(-2)[..., :hidden]
    return x.to(dtype)
