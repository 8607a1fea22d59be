"""The FP8 casts whose outputs backward reads, as opaque operators for ``torch.compile``.

Why: traced inline into a compiled block, a cast to FP8 is a handful of element-wise aten ops that inductor's
min-cut partitioner may recompute in backward; it does, keeping the bf16 inputs instead of the FP8 copies, so a
compiled FP8 block saved 13% more than the eager one (benchmarks/results/fp8_compiled.md). Registered as custom
operators (``torch.library.custom_op``) they are single nodes the partitioner will not recompute (not in its
allowlist) when the forward needs them, so their FP8 outputs are what it saves: the eager set. Hence each cast is
tied to a forward output (the norm/SwiGLU/GELU forwards are one operator each; the bf16-GEMM linear takes the FP8
copy of its input), and the backward GEMMs that read FP8 copies are operators too (else the partitioner moves their
dequantise into the forward and saves its bf16 output). The FP8 autograd Functions call these only while
dynamo traces them and only on plain tensors (:func:`opaque`); eager runs, and DTensor (tensor/sequence-parallel)
operands, keep calling the quantisers directly (a tensor-parallel linear with FP8 GEMMs computes on its local shards,
plain tensors, and so does use them). Each operator runs the quantiser of :mod:`meshwright.memory.fp8_cast`
or :mod:`meshwright.memory.fp8_fused` at execution time (compiled by itself on GPUs), so its bits are the eager ones.
No autograd is registered: they run inside the forward or backward of an autograd Function, which owns the
backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from meshwright.memory import fp8_cast, fp8_fused, fp8_gemm
from meshwright.optim import fp8_quant

Tensor = torch.Tensor


_OPAQUE = True  # set_opaque(False): traced casts inline again, so inductor may fuse them with their neighbours
_OPAQUE_GRADS = True  # set_opaque(True, grads=False): the backward's output-gradient casts traced inline


def set_opaque(enabled: bool, grads: bool | None = None) -> None:
    """Keep compiled FP8 blocks' casts opaque (True, the default: the FP8 copies are saved, the eager bytes) or trace
    them inline (False: inductor fuses them with the norm/activation/bias next to them, and saves bf16 instead).
    The trade is memory against fusion; ``benchmarks/bench_coat_gpu.py`` times both (``coat`` and ``coat_fused``).
    ``grads`` (default: as ``enabled``): the same for the backward's casts of output gradients, where nothing is
    saved: opaque, they run the Triton casts (memory/fp8_triton.py); inline, inductor fuses each absmax with the
    kernel that produced the gradient."""
    global _OPAQUE, _OPAQUE_GRADS
    _OPAQUE = bool(enabled)
    _OPAQUE_GRADS = _OPAQUE if grads is None else bool(grads)


def opaque(*tensors: Tensor | None) -> bool:
    """Whether to call the operators here: dynamo is tracing, the operators are on, and no operand is a DTensor."""
    return _OPAQUE and torch.compiler.is_compiling() and not any(isinstance(t, DTensor) for t in tensors)


def opaque_grads(*tensors: Tensor | None) -> bool:
    """:func:`opaque` for the backward's casts of output gradients."""
    return _OPAQUE_GRADS and torch.compiler.is_compiling() and not any(isinstance(t, DTensor) for t in tensors)


def _own(outs: tuple[Tensor, ...], *inputs: Tensor | None) -> tuple[Tensor, ...]:
    """``outs``, copied where one shares an input's storage (a custom operator's outputs may not alias its inputs:
    an fp32 input's ``.float()`` is the input itself) or is not contiguous (the fake implementations say it is)."""
    taken = {i.untyped_storage().data_ptr() for i in inputs if i is not None}
    return tuple(t.clone(memory_format=torch.contiguous_format)
                 if t.untyped_storage().data_ptr() in taken or not t.is_contiguous() else t for t in outs)


@torch.library.custom_op("meshwright::fp8_quant_tensor", mutates_args=())
def quant_tensor(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """:func:`fp8_quant.quantize_per_tensor`: (FP8 copy of x, fp32 scale)."""
    return _own(fp8_cast.quantize_per_tensor(x, dtype), x)


@quant_tensor.register_fake
def _(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=dtype), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("meshwright::fp8_quant_tensor_t", mutates_args=())
def quant_tensor_t(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`fp8_quant.quantize_per_tensor_t`: (FP8 copy (rows, k), its transpose (k, rows), fp32 scale)."""
    return _own(fp8_cast.quantize_per_tensor_t(x, dtype), x)


@quant_tensor_t.register_fake
def _(x: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor]:
    k = x.shape[-1]
    rows = x.numel() // k
    return x.new_empty((rows, k), dtype=dtype), x.new_empty((k, rows), dtype=dtype), x.new_empty((), dtype=torch.float32)


@torch.library.custom_op("meshwright::fp8_quant_groups", mutates_args=())
def quant_groups(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    """:func:`fp8_quant.quantize_last_dim_groups` (E4M3): (FP8 copy of x, fp32 scale per 1 x group)."""
    return _own(fp8_cast.quantize_last_dim_groups(x, group), x)


def _group_scales(x: Tensor, group: int) -> Tensor:
    return x.new_empty((*x.shape[:-1], fp8_quant.groups_of(x.shape[-1], group)), dtype=torch.float32)


@quant_groups.register_fake
def _(x: Tensor, group: int) -> tuple[Tensor, Tensor]:
    return x.new_empty(x.shape, dtype=torch.float8_e4m3fn), _group_scales(x, group)


@torch.library.custom_op("meshwright::fp8_rmsnorm_fwd", mutates_args=())
def rmsnorm_fwd(x: Tensor, weight: Tensor, eps: float, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`fp8_fused.rmsnorm_forward`: (output, fp32 1/rms, FP8 1 x group copy of x, its scales)."""
    return _own(fp8_fused.fused_rmsnorm_forward(x, weight, eps, group), x, weight)


@rmsnorm_fwd.register_fake
def _(x: Tensor, weight: Tensor, eps: float, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out = torch.empty(torch.broadcast_shapes(x.shape, weight.shape), dtype=torch.promote_types(x.dtype, weight.dtype),
                      device=x.device)
    rstd = x.new_empty((*x.shape[:-1], 1), dtype=torch.float32)
    return out, rstd, x.new_empty(x.shape, dtype=torch.float8_e4m3fn), _group_scales(x, group)


@torch.library.custom_op("meshwright::fp8_swiglu_fwd", mutates_args=())
def swiglu_fwd(a: Tensor, b: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """:func:`fp8_fused.swiglu_forward`: (silu(a) * b, FP8 1 x group copies of a and b with their scales)."""
    return _own(fp8_fused.fused_swiglu_forward(a, b, group), a, b)


@swiglu_fwd.register_fake
def _(a: Tensor, b: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    out = torch.empty(torch.broadcast_shapes(a.shape, b.shape), dtype=torch.promote_types(a.dtype, b.dtype),
                      device=a.device)
    return (out, a.new_empty(a.shape, dtype=torch.float8_e4m3fn), _group_scales(a, group),
            b.new_empty(b.shape, dtype=torch.float8_e4m3fn), _group_scales(b, group))


@torch.library.custom_op("meshwright::fp8_gelu_fwd", mutates_args=())
def gelu_fwd(a: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """(gelu(a) with the tanh approximation, FP8 1 x group copy of a, its scales): the output ties the cast to the
    forward (an operator whose outputs only backward reads may be moved there by the partitioner, and was)."""
    q, s = fp8_cast.quantize_last_dim_groups(a, group)
    return _own((F.gelu(a, approximate="tanh"), q, s), a)


@gelu_fwd.register_fake
def _(a: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    return a.new_empty(a.shape), a.new_empty(a.shape, dtype=torch.float8_e4m3fn), _group_scales(a, group)


@torch.library.custom_op("meshwright::fp8_linear", mutates_args=())
def linear(x: Tensor, q: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``F.linear(x, weight, bias)`` on operands already in the compute dtype. ``q`` (the FP8 copy of x that backward
    reads) is not used: taking it makes its cast part of the forward, which the partitioner then cannot move into the
    backward (it did, for a cast whose outputs only backward reads), so the FP8 copy is what it saves."""
    return _own((F.linear(x, weight, bias),), x, q, weight, bias)[0]


@linear.register_fake
def _(x: Tensor, q: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


# ---- backward GEMMs on the saved FP8 copies ----------------------------------------------------------------------
# Traced inline, the dequantise of a saved FP8 copy depends on forward values only, and the partitioner moves it into
# the forward and saves its bf16 output (it bans recomputing what a backward matmul consumes). Inside one operator
# with the output gradient as an input, the dequantise runs in the backward, on the FP8 copy the forward saved.
@torch.library.custom_op("meshwright::fp8_weight_grad", mutates_args=())
def weight_grad(grad: Tensor, q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """grad (tokens, n)^T @ dequantised q (tokens, k) in ``dtype``: a linear's weight gradient from its FP8 input."""
    x = fp8_cast.dequantize_per_tensor(q, scale, dtype)
    return _own((grad.t() @ x.reshape(-1, x.shape[-1]),), grad, q, scale)[0]


@weight_grad.register_fake
def _(grad: Tensor, q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    return grad.new_empty((grad.shape[-1], q.shape[-1]), dtype=torch.promote_types(grad.dtype, dtype))


@torch.library.custom_op("meshwright::fp8_mm", mutates_args=())
def mm(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    """:func:`fp8_gemm.fp8_mm` (FP8 (M, K) @ FP8 (K, N) with per-tensor scales) as one operator."""
    return _own((fp8_gemm.fp8_mm(a, a_scale, b, b_scale, out_dtype, backend),), a, a_scale, b, b_scale)[0]


@mm.register_fake
def _(a: Tensor, a_scale: Tensor, b: Tensor, b_scale: Tensor, out_dtype: torch.dtype, backend: str) -> Tensor:
    return a.new_empty((a.shape[0], b.shape[1]), dtype=out_dtype)
