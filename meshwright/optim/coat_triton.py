"""CoatAdamW's Triton step: every parameter of a param group updated by one kernel launch (#18).

Why: the compiled step (:mod:`meshwright.optim.coat_fused`) still costs one guarded call and several
kernels per parameter (group reductions, then quantisation); on an H200 that was 4.95x torch's fused
AdamW. The COAT update moves ~16 bytes per parameter, so one pass over memory is the floor. The
kernel (:mod:`meshwright.optim._coat_triton_kernels`) reads each weight, gradient and FP8 moment once
and writes them once, a program per block of whole groups, and finds the parameters through a table
of their offsets from one base tensor: one launch per param group and step, the per-step scalars as kernel arguments (no
recompilation when the learning rate or step changes).

The moments and their metadata are updated in place; the state layout is the reference's, so
``state_dict()``, checkpoints and resharding are unchanged. Triton is imported lazily: CPU tensors run
under Triton's interpreter (slow, for tests), CUDA tensors compiled.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
import sys
import weakref
from pathlib import Path
from types import ModuleType
from typing import Sequence

import torch

from meshwright.errors import invalid
from meshwright.optim.coat_fused import Moment
from meshwright.optim.fp8_quant import fp8_max, groups_of

BLOCK_GROUPS = 8  # groups per program: 8 x 128 = 1024 elements, 4 warps
NUM_WARPS = 4
# Per-element math on CUDA: "fast" (the hardware's approximate exp2/log2, division and square root) or
# "precise" (libdevice powf as torch's CUDA pow, IEEE division/sqrt: ~4x the instructions, compute-bound)
MATH = "fast"
_MATH_CODES = {"precise": 1, "fast": 2}
INTERPRET_MATH = 0  # CPU tensors (Triton's interpreter): 0 IEEE, 3 the fast mode's code paths (tests)
# the kernels' FP8 encoders (CoatAdamW's moments, memory/fp8_triton.py's casts): mantissa bits, exponent bias, e5m2
KERNEL_FORMATS = {torch.float8_e4m3fn: (3, 7, False), torch.float8_e5m2: (2, 15, True)}
_KERNELS: dict[bool, ModuleType] = {}
_WORK: dict[tuple, torch.Tensor] = {}
_TABLES: dict[tuple, torch.Tensor] = {}


@functools.lru_cache(maxsize=None)
def triton_available() -> bool:
    """Whether ``triton`` imports (the GPU image has it; CPU machines may not)."""
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def kernels(interpret: bool) -> ModuleType:
    """The kernel module, compiled (CUDA) or interpreted (CPU tensors): Triton fixes the mode when a
    function is decorated, so the file is executed once per mode as its own module."""
    if interpret not in _KERNELS:
        import triton

        name = f"meshwright.optim._coat_triton_kernels_{'interpreted' if interpret else 'compiled'}"
        spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name("_coat_triton_kernels.py"))
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        knobs = getattr(triton, "knobs", None)  # triton >= 3.4; older ones read the environment
        saved = knobs.runtime.interpret if knobs else os.environ.get("TRITON_INTERPRET")
        if knobs:
            knobs.runtime.interpret = interpret
        else:
            os.environ["TRITON_INTERPRET"] = "1" if interpret else "0"
        try:
            sys.modules[name] = module  # Triton reads the source of the functions through their module
            spec.loader.exec_module(module)
        finally:
            if knobs:
                knobs.runtime.interpret = saved
            elif saved is None:
                os.environ.pop("TRITON_INTERPRET", None)
            else:
                os.environ["TRITON_INTERPRET"] = saved
        _KERNELS[interpret] = module
    return _KERNELS[interpret]


def eligible(param: torch.Tensor, grad: torch.Tensor) -> str | None:
    """None when the kernel can update ``param``; else why not (the caller falls back or errors)."""
    if param.dtype != torch.float32 or grad.dtype != torch.float32:
        return f"fp32 weights and gradients (got {param.dtype}/{grad.dtype})"
    if param.device != grad.device or param.device.type not in ("cuda", "cpu"):
        return f"weight and gradient on one CUDA (or, interpreted, CPU) device (got {param.device}/{grad.device})"
    if not (param.is_contiguous() and grad.is_contiguous()):
        return "contiguous weights and gradients"
    return None


def _work_table(numels: tuple[int, ...], group_size: int, device: torch.device) -> torch.Tensor:
    """(parameter index, first group) per program, int32 pairs; cached per parameter sizes."""
    key = (numels, group_size, BLOCK_GROUPS, device)
    if key not in _WORK:
        blocks = torch.tensor([-(-groups_of(n, group_size) // BLOCK_GROUPS) for n in numels], dtype=torch.int64)
        tensor = torch.repeat_interleave(torch.arange(len(numels)), blocks)
        starts = torch.cumsum(blocks, 0) - blocks
        first = (torch.arange(int(blocks.sum())) - starts[tensor]) * BLOCK_GROUPS
        _WORK[key] = torch.stack([tensor, first], 1).to(torch.int32).contiguous().to(device)
        if len(_WORK) > 64:  # parameter sets change rarely; keep the cache small anyway
            _WORK.pop(next(iter(_WORK)))
    return _WORK[key]


def _table(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """The address table on ``device``; reused while the tensors stay where they are (the caching
    allocator usually hands gradients the same blocks every step), so most steps copy nothing to the
    GPU (a copy from pageable memory would wait for the work queued before the step)."""
    key = (rows, device)
    if key not in _TABLES:
        _TABLES[key] = torch.tensor(rows, dtype=torch.int64).to(device)
        if len(_TABLES) > 16:
            _TABLES.pop(next(iter(_TABLES)))
    return _TABLES[key]


class _Checked:
    """What one parameter's launch needs that does not change between steps, checked once: its moments (by weak
    reference: a replaced moment, after ``load_state_dict`` say, is a miss), its size, and the addresses and
    alignment of the weight and the eight moment tensors."""

    __slots__ = ("param", "weight_addr", "refs", "n", "addrs", "aligned", "spec")

    def __init__(self, p: torch.Tensor, moments: tuple[torch.Tensor, ...], addrs: list[int], aligned: bool,
                 spec: tuple) -> None:
        self.weight_addr, self.n, self.addrs, self.aligned, self.spec = p.data_ptr(), p.numel(), addrs, aligned, spec
        self.param = weakref.ref(p)
        self.refs = tuple(weakref.ref(t) for t in moments)

    def holds(self, p: torch.Tensor, moments: tuple[torch.Tensor, ...]) -> bool:
        return (self.param() is p and p.data_ptr() == self.weight_addr and len(moments) == len(self.refs)
                and all(r() is t for r, t in zip(self.refs, moments)))


# Per parameter, the checks of its last launch. Only the gradient (a new tensor after zero_grad(set_to_none=True))
# is checked at every step: on an H200 the per-step checks of all ten tensors of 201 parameters took longer than
# the kernel (benchmarks/bench_coat_optim_host.py).
# Keyed by id(): an entry names its parameter by weak reference, so a new tensor at a reused id is a miss.
_CHECKED: dict[int, _Checked] = {}


def checked(p: torch.Tensor, moments: tuple[torch.Tensor, ...]) -> _Checked | None:
    """The checks of an earlier launch on ``p`` with these very moment tensors (contiguous and sized), or None."""
    entry = _CHECKED.get(id(p))
    return entry if entry is not None and entry.holds(p, moments) else None


def _check(i: int, p: torch.Tensor, m: Moment, v: Moment, group_size: int, m_dtype: torch.dtype, v_dtype: torch.dtype,
           device: torch.device) -> _Checked:
    """The one-time checks of parameter ``i``'s weight and moments; the kernel writes through raw addresses."""
    ts = (p, *m, *v)
    n, n_groups = p.numel(), groups_of(p.numel(), group_size)
    if len(ts) != 9 or p.dtype != torch.float32 or m[0].numel() != n or v[0].numel() != n \
            or any(t.numel() != n_groups for t in (*m[1:], *v[1:])) or m[0].dtype != m_dtype or v[0].dtype != v_dtype \
            or any(t.dtype != torch.float32 for t in (*m[1:], *v[1:])):
        raise invalid("optimizer.state", f"parameter {i} ({tuple(p.shape)})", "fp32 weight and gradient, moments "
                      f"of {n} elements in {m_dtype}/{v_dtype} and fp32 metadata of {n_groups} groups each")
    if not all(t.is_contiguous() and t.device == device for t in ts):
        raise invalid("optimizer.state", f"parameter {i} ({tuple(p.shape)})", f"contiguous tensors on {device}")
    addrs = [t.data_ptr() for t in ts]
    aligned = n % 4 == 0 and group_size % 4 == 0 and all(a % 16 == 0 for a in addrs)
    entry = _Checked(p, ts[1:], addrs, aligned, (group_size, m_dtype, v_dtype, device))
    if len(_CHECKED) > 4 * 4096:  # parameters that no longer exist: drop their entries now and then
        for key in [k for k, e in _CHECKED.items() if e.param() is None]:
            del _CHECKED[key]
    _CHECKED[id(p)] = entry
    return entry


def coat_adamw_triton(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], ms: Sequence[Moment],
                      vs: Sequence[Moment], *, lr: float, weight_decay: float, beta1: float, beta2: float,
                      eps: float, step: float, group_size: int, m_dtype: torch.dtype, v_dtype: torch.dtype,
                      expand: bool, k_min: float, entries: Sequence[_Checked | None] | None = None) -> None:
    """One AdamW step on every ``params[i]`` (in place) and its FP8 moments ``ms[i]``/``vs[i]`` (in place:
    data, scale, centre, exponent), all on one device, all at the same ``step`` (already incremented).

    The scalars are the reference's, computed in double and rounded to fp32 as torch does. ``entries``: what
    :func:`checked` returned for each parameter with these moments, where the caller asked already.
    """
    if not params:
        return
    device = params[0].device
    spec = (group_size, m_dtype, v_dtype, device)  # what the checks were against
    infos: dict[bool, list] = {True: [], False: []}  # aligned or not -> (index, addresses)
    for i, (p, g, m, v) in enumerate(zip(params, grads, ms, vs)):
        entry = entries[i] if entries is not None else _CHECKED.get(id(p))
        if entry is None or entry.spec != spec or (entries is None and not entry.holds(p, (*m, *v))):
            entry = _check(i, p, m, v, group_size, m_dtype, v_dtype, device)
        if g.dtype != torch.float32 or g.numel() != entry.n or not g.is_contiguous() or g.device != device:
            raise invalid("optimizer.state", f"parameter {i} ({tuple(p.shape)})",
                          f"a contiguous fp32 gradient of {entry.n} elements on {device}")
        if entry.n == 0:  # an empty local shard (FSDP2 on more ranks than elements): nothing to read or write
            continue
        ga = g.data_ptr()
        infos[entry.aligned and ga % 16 == 0].append((i, [entry.addrs[0], ga, *entry.addrs[1:]]))
    for aligned, items in infos.items():  # 16-byte accesses where every tensor allows them (~2.5x fewer instructions)
        if items:
            idx = [i for i, _ in items]
            _launch([params[i] for i in idx], [ms[i][0] for i in idx], [a for _, a in items], aligned, lr=lr,
                    weight_decay=weight_decay, beta1=beta1, beta2=beta2, eps=eps, step=step, group_size=group_size,
                    m_dtype=m_dtype, v_dtype=v_dtype, expand=expand, k_min=k_min)
    # written behind autograd's back: bump versions as an in-place op would (one call for the list)
    torch.autograd.graph.increment_version(list(params))


def _launch(params: Sequence[torch.Tensor], m_data: Sequence[torch.Tensor], addrs: Sequence[list[int]], aligned: bool, *,
            lr: float, weight_decay: float, beta1: float, beta2: float, eps: float, step: float, group_size: int,
            m_dtype: torch.dtype, v_dtype: torch.dtype, expand: bool, k_min: float) -> None:
    """One kernel launch over ``params`` (``addrs``: each one's 10 tensor addresses, in the kernel's
    order). The table holds each tensor's distance in elements from one base tensor of its dtype:
    pointer arithmetic from a kernel argument keeps Triton's alignment analysis."""
    device = params[0].device
    base32, base8 = params[0], m_data[0].view(torch.uint8)
    b32, b8 = base32.data_ptr(), base8.data_ptr()
    rows = []
    for p, a in zip(params, addrs):
        rows += [(a[0] - b32) // 4, (a[1] - b32) // 4, a[2] - b8, (a[3] - b32) // 4, (a[4] - b32) // 4,
                 (a[5] - b32) // 4, a[6] - b8, (a[7] - b32) // 4, (a[8] - b32) // 4, (a[9] - b32) // 4, p.numel()]
    ptrs = _table(tuple(rows), device)
    work = _work_table(tuple(p.numel() for p in params), group_size, device)
    (m_mbits, m_bias, m_e5m2), (v_mbits, v_bias, v_e5m2) = KERNEL_FORMATS[m_dtype], KERNEL_FORMATS[v_dtype]
    target = lambda dtype: math.log2(fp8_max(dtype) ** 2 / 2)  # noqa: E731 - as fp8_quant.expansion_exponent
    interpret = device.type == "cpu"
    kernel = kernels(interpret).coat_adamw_kernel
    kernel[(work.shape[0],)](
        base32, base8, ptrs, work,
        *(float(x) for x in (1 - lr * weight_decay, -lr / (1 - beta1 ** step), math.sqrt(1 - beta2 ** step),
                             1 - beta1, beta2, 1 - beta2, eps, k_min, target(m_dtype), target(v_dtype))),
        GROUP=group_size, GP2=triton_next_pow2(group_size), BLOCK_G=BLOCK_GROUPS, EXPAND=bool(expand),
        M_MBITS=m_mbits, M_BIAS=m_bias, M_E5M2=m_e5m2, M_FMAX=fp8_max(m_dtype),
        V_MBITS=v_mbits, V_BIAS=v_bias, V_E5M2=v_e5m2, V_FMAX=fp8_max(v_dtype),
        MATH=INTERPRET_MATH if interpret else _MATH_CODES[MATH], ALIGNED=aligned, num_warps=NUM_WARPS, enable_fp_fusion=False)


def triton_next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()
