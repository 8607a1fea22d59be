"""Forward and backward of the FP8-saving RMSNorm and SwiGLU product, each one compiled unit on GPUs.

Why: eagerly, the RMSNorm backward on its FP8 copy is a dequantise plus ten fp32 element-wise kernels
over (tokens, d_model), and the SwiGLU product's backward two dequantises plus nine kernels over
(tokens, ffn): ~3 GB and ~4.7 GB of memory traffic per block at the 1.3B's 16k tokens, where a fused
kernel reads the FP8 copies and the gradient once and writes the results once (benchmarks/results/coat.md,
"Where the FP8 path's time goes"). COAT fuses them in Triton; here ``torch.compile`` does it through
:class:`meshwright.memory.fp8_cast.CompiledOnDevices` (CPU tensors run the same code eagerly, so CPU
tests check the numerics; on GPUs inductor computes the chain in fp32 registers, rounding once).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from meshwright.memory.fp8_cast import CompiledOnDevices
from meshwright.optim import fp8_quant


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float, group: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(RMSNorm output as the plain layer computes it, fp32 1/rms, FP8 1 x ``group`` copy of x, scales)."""
    xf = x.float()
    rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    q, s = fp8_quant.quantize_last_dim_groups(x, group)
    return (xf * rstd).type_as(x) * weight, rstd, q, s


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
    return F.silu(a) * b, qa, sa, qb, sb


def swiglu_backward(grad: torch.Tensor, qa: torch.Tensor, sa: torch.Tensor, qb: torch.Tensor, sb: torch.Tensor,
                    group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of silu(a) * b for a and b, in grad's dtype, from the FP8 copies."""
    a = fp8_quant.dequantize_last_dim_groups(qa, sa, group, grad.dtype)
    b = fp8_quant.dequantize_last_dim_groups(qb, sb, group, grad.dtype)
    sig = torch.sigmoid(a)
    silu = a * sig
    return grad * b * sig * (1 + a * (1 - sig)), grad * silu


fused_rmsnorm_forward = CompiledOnDevices(rmsnorm_forward)
fused_rmsnorm_backward = CompiledOnDevices(rmsnorm_backward)
fused_swiglu_forward = CompiledOnDevices(swiglu_forward)
fused_swiglu_backward = CompiledOnDevices(swiglu_backward)
