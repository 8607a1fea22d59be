"""Forward and backward of the FP8-saving RMSNorm and SwiGLU product, each one compiled unit on GPUs.

Why: eagerly, the RMSNorm backward on its FP8 copy is a dequantise plus ten fp32 element-wise kernels
over (tokens, d_model), and the SwiGLU product's backward two dequantises plus nine kernels over
(tokens, ffn): ~3 GB and ~4.7 GB of memory traffic per block at the 1.3B's 16k tokens, where a fused
kernel reads the FP8 copies and the gradient once and writes the results once (benchmarks/results/coat.md,
"Where the FP8 path's time goes"). COAT fuses them in Triton; here ``torch.compile`` does it through
:class:`meshwright.memory.fp8_cast.CompiledOnDevices` (CPU tensors run the same code eagerly, so CPU
tests check the numerics; on GPUs inductor computes the chain in fp32 registers, rounding once). The forwards'
FP8 casts go to the Triton group cast of :mod:`meshwright.memory.fp8_triton` where it takes the inputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshwright.memory import fp8_triton
from meshwright.memory.fp8_cast import CompiledOnDevices, TritonOrCompiled
from meshwright.optim import fp8_quant


def rmsnorm_output(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm output as the plain layer computes it, fp32 1/rms)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * rstd).type_as(x) * weight, rstd


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RMSNorm output as the plain layer computes it, fp32 1/rms, FP8 1 x ``group`` copy of x, scales)."""
    out, rstd = rmsnorm_output(x, weight, eps)
    q, s = fp8_quant.quantize_last_dim_groups(x, group)
    return out, rstd, q, s


def rmsnorm_backward(grad: torch.Tensor, q: torch.Tensor, s: torch.Tensor, rstd: torch.Tensor,
                     weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input gradient in grad's dtype, fp32 weight gradient) from the FP8 copy of the input."""
    xhat = fp8_quant.dequantize_last_dim_groups(q, s, group) * rstd
    g = grad.float()
    gw = (g * xhat).sum(tuple(range(g.dim() - 1)))  # no flatten: a sequence-sharded DTensor may not (torch 2.11)
    dxhat = g * weight.float()
    gx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
    return gx.to(grad.dtype), gw


def swiglu_forward(a: torch.Tensor, b: torch.Tensor, group: int
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(silu(a) * b, FP8 1 x ``group`` copies of a and b with their scales)."""
    qa, sa = fp8_quant.quantize_last_dim_groups(a, group)
    qb, sb = fp8_quant.quantize_last_dim_groups(b, group)
    return swiglu_product(a, b), qa, sa, qb, sb


def swiglu_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.silu(a) * b


def swiglu_backward(grad: torch.Tensor, qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                    group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of silu(a) * b for a and b, in grad's dtype, from the FP8 copies."""
    a = fp8_quant.dequantize_last_dim_groups(qa, sa, group, grad.dtype)
    b = fp8_quant.dequantize_last_dim_groups(qb, sb, group, grad.dtype)
    sig = torch.sigmoid(a)
    silu = a * sig
    return grad * b * sig * (1 + a * (1 - sig)), grad * silu


compiled_rmsnorm_forward = CompiledOnDevices(rmsnorm_forward)
compiled_swiglu_forward = CompiledOnDevices(swiglu_forward)
fused_rmsnorm_backward = CompiledOnDevices(rmsnorm_backward)
fused_swiglu_backward = CompiledOnDevices(swiglu_backward)
# Where the Triton group cast takes the inputs (memory/fp8_triton.py), the forwards run as the compiled norm or
# product plus that cast: one more read of the input than one fused unit, for a cast at memory bandwidth
compiled_rmsnorm_output = CompiledOnDevices(rmsnorm_output)
compiled_swiglu_product = CompiledOnDevices(swiglu_product)


def _rmsnorm_then_cast(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (*compiled_rmsnorm_output(x, weight, eps), *fp8_triton.quantize_last_dim_groups(x, group))


def _swiglu_then_cast(a: torch.Tensor, b: torch.Tensor, group: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    return (compiled_swiglu_product(a, b), *fp8_triton.quantize_last_dim_groups(a, group),
            *fp8_triton.quantize_last_dim_groups(b, group))


fused_rmsnorm_forward = TritonOrCompiled(_rmsnorm_then_cast, compiled_rmsnorm_forward,
                                         lambda x, weight, eps, group: fp8_triton.runs(x, group=group))
fused_swiglu_forward = TritonOrCompiled(_swiglu_then_cast, compiled_swiglu_forward,
                                        lambda a, b, group: fp8_triton.runs(a, group=group)
                                        and fp8_triton.runs(b, group=group))
