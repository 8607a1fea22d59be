"""FP8 GEMMs for linear layers: ``torch._scaled_mm`` on GPUs with FP8 tensor cores, an emulation elsewhere.

Why: FP8 activations alone save memory; the time saving of COAT comes from running the linear layers'
three GEMMs (forward, input gradient, weight gradient) on FP8 tensor cores, which exist from compute
capability 8.9 (Ada, Hopper) on. COAT's recipe (NVlabs/COAT, ``coat/activation/real_quantization/linear/
fp8linear.py``, ``DefaultArgs(fabit="E4M3", fwbit="E4M3", bobit="E5M2")``): inputs and weights in E4M3
with one scale per tensor, output gradients in E5M2 with one scale per tensor (two more exponent bits
for the wider range of gradients), accumulation in fp32, results in the compute dtype.

The emulation dequantises both FP8 operands and runs an ordinary matmul: the same quantisation, so
CPU tests check the numerics that the GPU path computes (up to accumulation order).
"""

from __future__ import annotations

import torch

INPUT_FP8 = torch.float8_e4m3fn  # COAT fabit
WEIGHT_FP8 = torch.float8_e4m3fn  # COAT fwbit
GRAD_FP8 = torch.float8_e5m2  # COAT bobit
ALIGN = 16  # _scaled_mm needs every GEMM dimension divisible by 16
BACKENDS = ("scaled_mm", "emulate")


def scaled_mm_supported(device: torch.device | str) -> bool:
    """True where ``torch._scaled_mm`` runs on FP8 tensor cores: CUDA devices of compute capability >= 8.9.

    CPU builds of torch 2.13 implement ``_scaled_mm`` as a reference kernel (tests use it), but it is no
    faster than dequantise + matmul there, so the automatic choice is the emulation.
    """
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or not hasattr(torch, "_scaled_mm"):
        return False
    return torch.cuda.get_device_capability(device) >= (8, 9)


def cpu_scaled_mm_runs() -> bool:
    """Whether this torch build implements ``torch._scaled_mm`` on CPU (a reference kernel in 2.13): the real
    FP8 GEMM path, its layouts and scales, can then be checked without a GPU."""
    try:
        a = torch.zeros(16, 16).to(torch.float8_e4m3fn)
        torch._scaled_mm(a, a.t(), scale_a=torch.tensor(1.0), scale_b=torch.tensor(1.0), out_dtype=torch.float32)
        return True
    except (RuntimeError, NotImplementedError, AttributeError):
        return False


_CUDA_HAS_FP8: bool | None = None  # asked once per process (the GPUs of one job are of one kind)


def gemm_backend(device: torch.device | str) -> str:
    """``"scaled_mm"`` where the device has FP8 tensor cores, else ``"emulate"``."""
    global _CUDA_HAS_FP8
    if torch.device(device).type != "cuda":
        return "emulate"
    if _CUDA_HAS_FP8 is None:
        _CUDA_HAS_FP8 = scaled_mm_supported(device)
    return "scaled_mm" if _CUDA_HAS_FP8 else "emulate"


def _both_e5m2(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == torch.float8_e5m2 and b.dtype == torch.float8_e5m2  # no E5M2 x E5M2 tensor-core GEMM


def fp8_mm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
           out_dtype: torch.dtype, backend: str = "emulate") -> torch.Tensor:
    """``(a * a_scale) @ (b * b_scale)`` for FP8 ``a`` (M, K) and ``b`` (K, N) with fp32 per-tensor scales.

    ``scaled_mm`` falls back to the emulation for shapes it cannot take (a dimension not divisible by 16,
    or two E5M2 operands), so a layer never fails because of its size.
    """
    (m, k), n = a.shape, b.shape[1]
    if backend == "scaled_mm" and m % ALIGN == 0 and k % ALIGN == 0 and n % ALIGN == 0 and not _both_e5m2(a, b):
        a = a if a.is_contiguous() else a.contiguous()  # row-major
        b = b if b.t().is_contiguous() else b.t().contiguous().t()  # column-major
        return torch._scaled_mm(a, b, scale_a=a_scale.float().reshape(()), scale_b=b_scale.float().reshape(()),
                                out_dtype=out_dtype)
    return (a.float() * a_scale).to(out_dtype) @ (b.float() * b_scale).to(out_dtype)
