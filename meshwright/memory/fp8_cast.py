"""The activation quantisers of :mod:`meshwright.optim.fp8_quant`, compiled for GPU tensors.

Why: in eager mode one per-tensor FP8 cast of a bf16 activation is five passes over memory with fp32
temporaries (abs, amax, float, divide, clamp, cast); a block runs ~20 of them per step (inputs, weights
and output gradients of its linears, the 1x16 group casts of norms and the MLP), enough to eat the time
FP8 GEMMs save. ``torch.compile`` fuses each into one reduction and one cast kernel. The functions are
the same element-wise code and the amax is exact in any order, so results are those of the eager
functions: bit for bit with inductor's C++ backend (tested on CPU); Triton's fp32 division may differ in
the last bit, which can move a value sitting on an FP8 rounding boundary by one code. CPU tensors, and
every call after a compiler failure, take the eager functions.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from meshwright.optim import fp8_quant


class CompiledOnDevices:
    """Call ``fn`` compiled (built on first use) when its first argument lives on one of ``devices``."""

    def __init__(self, fn: Callable[..., Any], devices: tuple[str, ...] = ("cuda",)) -> None:
        self.fn, self.devices = fn, devices
        self._compiled: Callable[..., Any] | None = None
        self.broken = False

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if self.broken or x.device.type not in self.devices:
            return self.fn(x, *args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn, dynamic=True)
        try:
            return self._compiled(x, *args)
        except Exception as exc:  # noqa: BLE001 - no Triton / compiler here: stay correct, just slower
            self.broken = True
            warnings.warn(f"{self.fn.__name__}: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "using the eager quantiser", RuntimeWarning, stacklevel=2)
            return self.fn(x, *args)


quantize_per_tensor = CompiledOnDevices(fp8_quant.quantize_per_tensor)
dequantize_per_tensor = CompiledOnDevices(fp8_quant.dequantize_per_tensor)
quantize_last_dim_groups = CompiledOnDevices(fp8_quant.quantize_last_dim_groups)
dequantize_last_dim_groups = CompiledOnDevices(fp8_quant.dequantize_last_dim_groups)
