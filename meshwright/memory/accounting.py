"""Deterministic memory metric: bytes saved for backward, counted with ``saved_tensors_hooks``.

Wall-clock and RSS are noisy on a shared CPU box; the bytes autograd keeps for backward are exact
and repeatable, so tests and the planner's memory model are checked against this count.
Unique storages are counted once (views of one tensor share storage) and parameters are excluded.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import nn


def _storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        st = t.untyped_storage()
    except (RuntimeError, NotImplementedError):  # e.g. tensor subclasses without storage
        return None
    return st.data_ptr(), st.nbytes()


@dataclass
class SavedBytes:
    """Result of a measurement: total bytes and per-dtype breakdown of unique saved storages."""

    total: int = 0
    by_dtype: dict[str, int] = field(default_factory=dict)
    count: int = 0


@contextmanager
def count_saved_bytes(module: nn.Module | None = None, exclude: list[torch.Tensor] | None = None) -> Iterator[SavedBytes]:
    """Count unique non-parameter storages autograd saves for backward inside the ``with`` block.

    ``module``'s parameters (and any ``exclude`` tensors) are not counted: they live anyway.
    Storage-less tensors (DTensor/FP8 subclasses) are counted through their local tensors where possible.
    """
    skip: set[tuple[int, int]] = set()
    for t in list(module.parameters() if module is not None else []) + list(exclude or []):
        local = t.to_local() if hasattr(t, "to_local") else t
        key = _storage_key(local.detach())
        if key is not None:
            skip.add(key)
    result = SavedBytes()
    seen: set[tuple[int, int]] = set()
    # Keep every counted tensor alive until the block exits: otherwise a freed storage's address can be
    # reused by a later micro-batch and wrongly skipped as "already counted".
    pinned: list[torch.Tensor] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        local = t.to_local() if hasattr(t, "to_local") else t
        key = _storage_key(local)
        if key is not None and key not in skip and key not in seen and key[1] > 0:
            seen.add(key)
            pinned.append(local)
            result.total += key[1]
            result.count += 1
            name = str(local.dtype).replace("torch.", "")
            result.by_dtype[name] = result.by_dtype.get(name, 0) + key[1]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        yield result
    pinned.clear()


def saved_bytes_of(fn, *args, module: nn.Module | None = None, **kwargs) -> tuple[object, SavedBytes]:
    """Run ``fn(*args, **kwargs)`` under ``count_saved_bytes`` and return (output, SavedBytes)."""
    with count_saved_bytes(module) as sb:
        out = fn(*args, **kwargs)
    return out, sb


def saved_bytes_per_token(block: nn.Module, fn: Callable[[torch.Tensor], torch.Tensor], d_model: int,
                          seqs: tuple[int, int], batch: int = 2, autocast_dtype: torch.dtype | None = torch.bfloat16,
                          device: str = "cpu") -> float:
    """Bytes ``fn`` (``block`` itself, or a compiled version of it) saves for backward per token: the slope of
    ``count_saved_bytes`` between two sequence lengths, so what does not grow with tokens (weight casts under
    autocast) drops out. Each length runs once before it is counted (a compiled ``fn`` builds its graph then).
    ``device``: where the input is made (the block must already be there)."""
    totals = []
    for seq in seqs:
        h = torch.randn(batch, seq, d_model, device=device, requires_grad=True)
        with torch.autocast(torch.device(device).type, autocast_dtype or torch.float32,
                            enabled=autocast_dtype is not None):
            fn(h)
            with count_saved_bytes(block) as saved:
                out = fn(h)
        out.float().sum().backward()
        totals.append(saved.total)
    return (totals[1] - totals[0]) / (batch * (seqs[1] - seqs[0]))
