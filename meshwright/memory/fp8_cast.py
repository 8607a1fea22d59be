"""The activation quantisers of :mod:`meshwright.optim.fp8_quant`, compiled for GPU tensors.

Why: in eager mode one per-tensor FP8 cast of a bf16 activation is five passes over memory with fp32
temporaries (abs, amax, float, divide, clamp, cast); a block runs ~20 of them per step (inputs, weights
and output gradients of its linears, the 1x16 group casts of norms and the MLP), enough to eat the time
FP8 GEMMs save. ``torch.compile`` fuses each into one reduction and one cast kernel. The functions are
the same element-wise code and the amax is exact in any order, so results are those of the eager
functions: bit for bit with inductor's C++ backend (tested on CPU); Triton's fp32 division may differ in
the last bit, which can move a value sitting on an FP8 rounding boundary by one code. CPU tensors, and
every call after a compiler failure, take the eager functions. The casts themselves go to the Triton
kernels of :mod:`meshwright.memory.fp8_triton` first where they take the tensor (contiguous, on CUDA):
inductor's versions ran at a fifth of memory bandwidth there (:class:`TritonOrCompiled`).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch

from meshwright.memory import fp8_triton, op_bytes
from meshwright.optim import fp8_quant


def _dynamic(t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    for d in range(t.dim()):
        torch._dynamo.maybe_mark_dynamic(t, d)
    return t


class CompiledOnDevices:
    """Call ``fn`` compiled (built on first use) when its first argument lives on one of ``devices``."""

    def __init__(self, fn: Callable[..., Any], devices: tuple[str, ...] = ("cuda",), passes: int = 1) -> None:
        self.fn, self.devices = fn, devices
        self.passes = passes  # reads of the inputs by the fused kernels (2 where a global amax precedes a cast)
        self._compiled: Callable[..., Any] | None = None
        self.broken = False

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if op_bytes.counting():  # counted as the fused kernel the GPU runs (memory/op_bytes.py)
            return op_bytes.run_as_fused(self.fn.__name__, self.fn, (x, *args), self.passes)
        if self.broken or x.device.type not in self.devices or torch.compiler.is_compiling():
            # traced into an enclosing graph (a compiled COAT model): the plain code, which the enclosing compile
            # fuses; a nested compile call would mark dimensions dynamic, which dynamo forbids while tracing
            return self.fn(x, *args)
        if self._compiled is None:
            self._compiled = torch.compile(self.fn)
        # One graph per input dtype and output format: plain detached tensors (a Parameter is another
        # type with static shapes for dynamo: one graph per weight shape) and autocast off (the forward
        # runs under autocast, the backward not). Beyond 8 graphs dynamo silently runs the function
        # eagerly (recompile_limit), as the quantisers of weights, inputs and gradients together did.
        # Tensor dimensions are dynamic from the first call (one graph for every shape), Python numbers
        # (group size, eps) constants: ``dynamic=True`` would make them symbols too (slower indexing).
        x, args = _dynamic(x), tuple(_dynamic(a) if isinstance(a, torch.Tensor) else a for a in args)
        try:
            with torch.autocast(x.device.type, enabled=False):
                return self._compiled(x, *args)
        except Exception as exc:  # noqa: BLE001 - no Triton / compiler here: stay correct, just slower
            self.broken = True
            warnings.warn(f"{self.fn.__name__}: torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); "
                          "using the eager quantiser", RuntimeWarning, stacklevel=2)
            return self.fn(x, *args)


class TritonOrCompiled:
    """A cast that runs as a Triton kernel (:mod:`meshwright.memory.fp8_triton`) where ``takes(x, *args)`` says it
    can and nothing traces or counts, else as ``compiled``. Why: inductor's kernels of the quantisers ran at a fifth of
    memory bandwidth on the GPU; the Triton ones make one pass. A kernel that fails (no compiler for this GPU, say)
    warns once, and every later call takes the compiled quantiser. ``fn`` and ``broken`` are the compiled one's."""

    def __init__(self, kernel: Callable[..., Any], compiled: CompiledOnDevices, takes: Callable[..., bool]) -> None:
        self.kernel, self.compiled, self.takes = kernel, compiled, takes
        self.fn = compiled.fn
        self.kernel_failed = False

    @property
    def broken(self) -> bool:
        return self.compiled.broken

    def __call__(self, x: torch.Tensor, *args: Any) -> Any:
        if (not self.kernel_failed and not torch.compiler.is_compiling() and not op_bytes.counting()
                and self.takes(x, *args)):
            try:
                return self.kernel(x, *args)
            except Exception as exc:  # noqa: BLE001 - stay correct with the compiled quantiser, just slower
                self.kernel_failed = True
                warnings.warn(f"{self.fn.__name__}: the Triton FP8 cast failed ({type(exc).__name__}: "
                              f"{str(exc)[:200]}); using the compiled quantiser", RuntimeWarning, stacklevel=2)
        return self.compiled(x, *args)


def _per_tensor_takes(x: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> bool:
    return fp8_triton.runs(x, dtype)


def _groups_takes(x: torch.Tensor, group: int = 16, dtype: torch.dtype = torch.float8_e4m3fn) -> bool:
    return fp8_triton.runs(x, dtype, group)


compiled_quantize_per_tensor = CompiledOnDevices(fp8_quant.quantize_per_tensor, passes=2)
compiled_quantize_per_tensor_t = CompiledOnDevices(fp8_quant.quantize_per_tensor_t, passes=2)
compiled_quantize_last_dim_groups = CompiledOnDevices(fp8_quant.quantize_last_dim_groups)
quantize_per_tensor = TritonOrCompiled(fp8_triton.quantize_per_tensor, compiled_quantize_per_tensor, _per_tensor_takes)
quantize_per_tensor_t = TritonOrCompiled(fp8_triton.quantize_per_tensor_t, compiled_quantize_per_tensor_t,
                                         _per_tensor_takes)
quantize_last_dim_groups = TritonOrCompiled(fp8_triton.quantize_last_dim_groups, compiled_quantize_last_dim_groups,
                                            _groups_takes)
dequantize_per_tensor = CompiledOnDevices(fp8_quant.dequantize_per_tensor)
dequantize_last_dim_groups = CompiledOnDevices(fp8_quant.dequantize_last_dim_groups)
