"""Count the kernels a forward+backward runs and the bytes each moves, without running them.

Why: FP8 GEMMs only pay off when the casts around them are few, fused passes; a stray fp32 round trip,
an eager transpose or a second cast of the same tensor costs as much as the GEMM saves (#18). A
``TorchDispatchMode`` sees every aten op that eager mode launches; under ``FakeTensorMode`` the shapes
of a 1.3B model cost nothing, so CPU tests and reports can count the memory passes of the GPU path.

Bytes of an op: the bytes of its tensor inputs plus those of its outputs (views and metadata ops move
nothing). Functions compiled for the GPU (:class:`meshwright.memory.fp8_cast.CompiledOnDevices`) run as
fused kernels there, so while counting they appear as one entry ``fused:<name>`` with the bytes a
fused kernel moves: its inputs read ``passes`` times (2 for a per-tensor cast: the amax must finish
before the cast starts) and its outputs written once; the eager ops inside are not counted.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

# ops that launch no kernel (metadata, views, allocation without a fill)
_FREE = {"aten.detach.default", "aten.empty.memory_format", "aten.empty_strided.default", "aten.lift_fresh.default",
         "aten.alias.default", "aten._unsafe_view.default", "prim.device.default", "aten.is_same_size.default",
         "aten.empty_like.default", "aten.new_empty.default", "aten.new_empty_strided.default"}


def _tensors(tree: Any) -> list[torch.Tensor]:
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class OpRecord:
    """One launched kernel: its name, bytes read and written, shapes and dtypes, and the phase."""

    name: str
    read: int
    written: int
    shapes: str
    phase: str = ""
    transpose: bool = False  # a copy that changes the memory layout (an eager transpose)

    @property
    def bytes(self) -> int:
        return self.read + self.written


@dataclass
class OpLog:
    records: list[OpRecord] = field(default_factory=list)
    phase: str = ""

    def total(self, phase: str | None = None) -> int:
        return sum(r.bytes for r in self.records if phase is None or r.phase == phase)

    def count(self, phase: str | None = None) -> int:
        return sum(1 for r in self.records if phase is None or r.phase == phase)

    def table(self, min_bytes: int = 0) -> str:
        """Markdown rows: phase, op, shapes, MB read, MB written."""
        rows = ["| phase | op | inputs -> outputs | MB read | MB written |", "|---|---|---|---|---|"]
        for r in self.records:
            if r.bytes >= min_bytes:
                rows.append(f"| {r.phase} | {r.name}{' (transpose)' if r.transpose else ''} | {r.shapes} "
                            f"| {r.read / 1e6:.1f} | {r.written / 1e6:.1f} |")
        return "\n".join(rows)


_ACTIVE: list["OpBytesMode"] = []


def _desc(ts: list[torch.Tensor]) -> str:
    short = {torch.float32: "f32", torch.bfloat16: "bf16", torch.float16: "f16", torch.float8_e4m3fn: "e4m3",
             torch.float8_e5m2: "e5m2", torch.int64: "i64", torch.bool: "bool", torch.uint8: "u8"}
    return ",".join(f"{short.get(t.dtype, str(t.dtype))}{list(t.shape)}" for t in ts if t.numel() > 1) or "scalars"


def _is_transpose_copy(name: str, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> bool:
    if not name.startswith(("aten.clone", "aten.copy", "aten._to_copy", "aten.contiguous")) or not ins or not outs:
        return False
    src, dst = ins[-1] if name.startswith("aten.copy") else ins[0], outs[0]
    return src.dim() >= 2 and src.numel() > 1 and src.stride() != dst.stride() and not src.is_contiguous() \
        and src.dim() == dst.dim()


class OpBytesMode(TorchDispatchMode):
    """Records every aten op that launches a kernel (see the module docstring) into ``self.log``."""

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.log = OpLog()
        self.fused = fused  # False: count the eager ops of compiled functions (the path without a compiler)
        self._paused = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self._paused:
            return out
        name = str(func)
        if getattr(func, "is_view", False) or name in _FREE:
            return out
        ins, outs = _tensors((args, kwargs)), _tensors(out)
        self.log.records.append(OpRecord(name.removeprefix("aten.").removesuffix(".default"),
                                         sum(_nbytes(t) for t in ins), sum(_nbytes(t) for t in outs),
                                         f"{_desc(ins)} -> {_desc(outs)}", self.log.phase,
                                         _is_transpose_copy(name, ins, outs)))
        return out

    def __enter__(self) -> "OpBytesMode":
        _ACTIVE.append(self)
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        _ACTIVE.remove(self)
        super().__exit__(*exc)

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Ops run inside are not recorded (setting up inputs, say)."""
        self._paused += 1
        try:
            yield
        finally:
            self._paused -= 1

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        old, self.log.phase = self.log.phase, name
        try:
            yield
        finally:
            self.log.phase = old


def counting() -> bool:
    """True while an :class:`OpBytesMode` records (compiled functions then count as one fused entry)."""
    return bool(_ACTIVE) and _ACTIVE[-1].fused


def run_as_fused(name: str, fn: Callable[..., Any], args: tuple, passes: int = 1) -> Any:
    """Run ``fn(*args)`` (its eager ops not recorded) and record one fused kernel's bytes for it."""
    mode = _ACTIVE[-1]
    mode._paused += 1
    try:
        out = fn(*args)
    finally:
        mode._paused -= 1
    ins, outs = _tensors(args), _tensors(out)
    mode.log.records.append(OpRecord(f"fused:{name}", passes * sum(_nbytes(t) for t in ins),
                                     sum(_nbytes(t) for t in outs), f"{_desc(ins)} -> {_desc(outs)}",
                                     mode.log.phase))
    return out
