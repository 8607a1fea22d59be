"""Keyed initialisation: each parameter's values depend only on (seed, parameter name, position), so any rank
draws exactly its own shard, on its own device, without replaying the rest of the model.

Why: the ``stream`` scheme (``Decoder.__init__``) draws every value from one CPU RNG stream in module order;
reproducing a shard of it means drawing everything before it, so every rank of a 70B run drew the whole model
on the host (minutes per rank). Here every parameter is cut into fixed tiles on its GLOBAL shape (the last two
dims in blocks of ``TILE``, leading dims one index at a time; 1-D tensors in blocks of ``TILE_1D``) and each
tile is drawn from a generator on the target device seeded by blake2b(seed, name, tile index). A shard draws
only the tiles it overlaps and copies the overlap, so the values do not depend on the layout: tp, FSDP and
pipeline shards equal the slices of the one-process ``keyed`` model bitwise, and the cost is about the
shard's size (plus at most one tile per cut), never the model's. The largest transient tensor is one tile.

The values depend on the device's generator (CUDA's Philox differs from the CPU's Mersenne twister), so a
CUDA run and a CPU run of the same seed start from different (identically distributed) weights; and they
differ from the ``stream`` scheme's. ``resolve_init`` therefore keeps ``stream`` on CPU by default (CPU fp32
trajectories, golden tests and earlier runs stay bit-identical) and picks ``keyed`` on CUDA, where models
are large and where the draw is nearly free.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterable, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from meshwright.errors import invalid

INIT_CHOICES = ("auto", "stream", "keyed")
TILE = 1024  # rows and columns of a tile of the last two dims: 4 MiB of fp32, small next to any shard that matters
TILE_1D = 1 << 20


@dataclass(frozen=True)
class ParamInit:
    """How one parameter starts: N(0, std), zeros or ones; ``key`` is the name its tiles are seeded by
    (a tied weight names its owner, so both copies draw the same values)."""

    kind: Literal["normal", "zeros", "ones"]
    key: str
    std: float = 0.0


def resolve_init(choice: str, device_type: str) -> str:
    """``auto``: ``keyed`` on CUDA, ``stream`` elsewhere (see the module docstring); else the choice itself."""
    if choice not in INIT_CHOICES:
        raise invalid("init", choice, ", ".join(INIT_CHOICES))
    if choice == "auto":
        return "keyed" if device_type == "cuda" else "stream"
    return choice


def tile_shape(shape: tuple[int, ...]) -> tuple[int, ...]:
    if len(shape) == 0:
        return ()
    if len(shape) == 1:
        return (TILE_1D,)
    return (1,) * (len(shape) - 2) + (TILE, TILE)


def tile_seed(seed: int, key: str, index: tuple[int, ...]) -> int:
    """A 63-bit seed from (seed, name, tile index): stable across processes and Python versions (not hash())."""
    digest = hashlib.blake2b(f"{seed}|{key}|{','.join(map(str, index))}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@torch.no_grad()
def fill_keyed(local: torch.Tensor, global_shape: tuple[int, ...], offset: tuple[int, ...], spec: ParamInit,
               seed: int, generator: torch.Generator | None = None, scratch: torch.Tensor | None = None) -> int:
    """Fill ``local``, the box of the global tensor starting at ``offset``, with the keyed values of ``spec``.
    ``scratch``: a reusable fp32 buffer of at least one tile on ``local``'s device (fresh 4 MiB host buffers
    cost a page fault per page, doubling the CPU time). Returns the values drawn (0 for constants)."""
    if spec.kind != "normal":
        local.fill_(0.0 if spec.kind == "zeros" else 1.0)
        return 0
    if local.numel() == 0:
        return 0
    gen = generator if generator is not None else torch.Generator(device=local.device)
    shape, tile = tuple(global_shape), tile_shape(tuple(global_shape))
    if not shape:
        shape, tile, offset, local = (1,), (1,), (0,), local.view(1)
    ranges = [range(o // t, (o + n - 1) // t + 1) for o, n, t in zip(offset, local.shape, tile)]
    drawn = 0
    for index in itertools.product(*ranges):
        lo = [i * t for i, t in zip(index, tile)]
        hi = [min(a + t, d) for a, t, d in zip(lo, tile, shape)]
        box = [b - a for a, b in zip(lo, hi)]
        if scratch is not None and scratch.numel() >= math.prod(box):
            buf = scratch[:math.prod(box)].view(box)
        else:
            buf = torch.empty(box, dtype=torch.float32, device=local.device)
        gen.manual_seed(tile_seed(seed, spec.key, index))
        buf.normal_(0.0, spec.std, generator=gen)  # contiguous: CPU's normal_ orders values differently on views
        drawn += buf.numel()
        src, dst = [], []
        for a, b, o, n in zip(lo, hi, offset, local.shape):
            s, e = max(a, o), min(b, o + n)
            src.append(slice(s - a, e - a))
            dst.append(slice(s - o, e - o))
        local[tuple(dst)].copy_(buf[tuple(src)])
        del buf
    return drawn


def local_box(param: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...], tuple[int, ...]]:
    """(this rank's local tensor, the global shape, the local tensor's offset in it) of a plain or DTensor parameter."""
    if isinstance(param, DTensor):
        shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
        local = param.to_local()
        if tuple(local.shape) != tuple(shape):
            raise RuntimeError(f"local shard {tuple(local.shape)} != expected {tuple(shape)} for a {tuple(param.shape)} "
                               f"DTensor with placements {param.placements}")
        return local, tuple(param.shape), tuple(offset)
    return param, tuple(param.shape), (0,) * param.dim()


@torch.no_grad()
def init_keyed(named: Iterable[tuple[str, torch.Tensor]], specs: dict[str, ParamInit], seed: int,
               boxes: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] | None = None) -> int:
    """Fill each (name, parameter) with its keyed values (``specs`` from ``Decoder.init_specs``); names not in
    ``specs`` are an error (a parameter nobody initialises). ``boxes``: {name: (global shape, offset)} of plain
    tensors that are shards cut by hand (megatron-core tp, expert parallelism: the runtime's ``shard_boxes``); DTensors
    carry theirs, and a DTensor over such a shard (FSDP over an ep shard) is placed inside its box. Returns the values
    drawn."""
    generators: dict[torch.device, torch.Generator] = {}
    scratch: dict[torch.device, torch.Tensor] = {}
    drawn = 0
    for name, param in named:
        spec = specs.get(name)
        if spec is None:
            raise KeyError(f"no keyed initialiser for parameter {name!r}")
        local, shape, offset = local_box(param)
        if boxes and name in boxes:  # the box places the (plain or DTensor) shard in the full tensor
            shape, base = boxes[name]
            offset = tuple(b + o for b, o in zip(base, offset))
        gen = generators.setdefault(local.device, torch.Generator(device=local.device))
        buf = scratch.get(local.device)
        need = math.prod(min(t, d) for t, d in zip(tile_shape(shape), shape))
        if spec.kind == "normal" and (buf is None or buf.numel() < need):  # one tile at most, reused
            buf = scratch[local.device] = torch.empty(need, dtype=torch.float32, device=local.device)
        drawn += fill_keyed(local, shape, offset, spec, seed, gen, buf)
    return drawn


def keyed_model(module: nn.Module, specs: dict[str, ParamInit], seed: int) -> int:
    """``init_keyed`` over a whole module (tied parameters filled once per name; both names share the key)."""
    return init_keyed(module.named_parameters(remove_duplicate=False), specs, seed)
