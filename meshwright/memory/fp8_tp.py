"""FP8 GEMMs on tensor-parallel (DTensor) linears: the FP8 linear runs on each rank's local shards.

Why: under ``ColwiseParallel``/``RowwiseParallel`` a linear's weight is a DTensor sharded over the tp
mesh and its input a DTensor; ``torch._scaled_mm`` has no DTensor sharding rule. Each rank therefore
takes its local weight shard and local input, runs COAT's FP8 linear on them (the same autograd Function
as without TP) and hands back the DTensor placement the TP plan expects, so the plan's output hooks do
the usual communication and nothing else changes:

* colwise (weight ``Shard(0)``, input ``Replicate``): ``y_local = x W_local^T (+ b_local)`` is the
  ``Shard(-1)`` output. The input gradient ``g_local W_local`` is only this rank's share, so the input
  is unwrapped with ``grad_placements=Partial``: the input hook's redistribution (``from_local`` of a
  replicated input: all-reduce; an SP all-gather: reduce-scatter) sums the shares in backward.
* rowwise (weight ``Shard(1)``, input ``Shard(-1)``): ``x_local W_local^T`` is a ``Partial`` sum; the
  plan's output hook reduces it (all-reduce, or reduce-scatter under SP). A (replicated) bias is added to
  the reduced DTensor by DTensor itself, so it counts once.

Scaling: per shard. Each rank computes the amax of its own operands (its weight shard, its input shard
for rowwise, its output-gradient shard for colwise); no extra collective, and a shard's scale is never
coarser than the whole tensor's, so each rank's FP8 rounding error is at most that of per-tensor scaling
of the full tensor. Where an operand is replicated (colwise input, rowwise output gradient) its scale is
the one-process scale. The price: sharded operands round on their own grid, so a tp run is not the
one-process FP8 run up to float round-off. It equals the same per-shard recipe computed in one process
(up to reduction order), and it tracks the one-process FP8 run within FP8 noise: on the tiny parity model
first-step gradients differ from it by 0.11-0.14 relative where the FP8 GEMMs themselves move gradients
by 0.10-0.13 (two independent FP8 roundings; tests/distributed/moe_savers_parity.py). A global scale
(all-reduce MAX per operand, as torchao's float8 gets from DTensor) would reproduce the one-process
numerics but puts a latency-bound collective before about 14 GEMMs per block and micro-batch (every
sharded operand, backward included) on the critical path, for no accuracy gain. (The unsharded FP8 linear
applied to DTensors does run through DTensor's own op rules, with amaxes reduced globally: measured on
CPU/gloo it matches the one-process run to 4e-7, but every cast becomes DTensor dispatch plus a collective
and the GEMMs' sharding is left to DTensor's rules; this module makes the local computation explicit.)
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from meshwright.errors import invalid

Wrap = Callable[[torch.Tensor], torch.Tensor]


def _is_shard(p: object, dim: int, ndim: int) -> bool:
    return isinstance(p, Shard) and p.dim % ndim == dim % ndim


def local_operands(x: torch.Tensor, weight: DTensor, bias: torch.Tensor | None,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, Wrap]:
    """(local x, local weight, local bias or None, wrap) for a column- or row-parallel ``weight``.

    ``wrap(y_local)`` returns the DTensor output the TP plan expects (``Shard(-1)`` or ``Partial`` plus
    the bias). ``bias`` is None in the result when ``wrap`` adds it (rowwise). Other layouts (2-D meshes,
    a replicated weight, an unexpected input placement) raise a one-line error naming the placement.
    """
    mesh = weight.device_mesh
    if mesh.ndim != 1:
        raise invalid("fp8_gemm weight mesh", mesh.ndim, "a 1-D tensor-parallel mesh (FP8 GEMMs on DTensor shards)")
    wp = weight.placements[0]
    x_p = x.placements[0] if isinstance(x, DTensor) else Replicate()
    if _is_shard(wp, 0, 2):  # colwise
        if not isinstance(x_p, Replicate):
            raise invalid("fp8_gemm colwise input placement", x_p, "Replicate()")
        x_local = x.to_local(grad_placements=(Partial(),)) if isinstance(x, DTensor) else x
        b_local = bias.to_local() if isinstance(bias, DTensor) else bias

        def wrap_col(y: torch.Tensor) -> torch.Tensor:
            return DTensor.from_local(y, mesh, (Shard(y.dim() - 1),), run_check=False)
        return x_local, weight.to_local(), b_local, wrap_col
    if _is_shard(wp, 1, 2):  # rowwise
        if not (isinstance(x, DTensor) and _is_shard(x_p, x.dim() - 1, x.dim())):
            raise invalid("fp8_gemm rowwise input placement", x_p, "Shard(-1)")

        def wrap_row(y: torch.Tensor) -> torch.Tensor:
            out = DTensor.from_local(y, mesh, (Partial(),), run_check=False)
            return out if bias is None else out + bias
        return x.to_local(), weight.to_local(), None, wrap_row
    raise invalid("fp8_gemm weight placement", wp, "Shard(0) (ColwiseParallel) or Shard(1) (RowwiseParallel)")


def cache_key(x_local: torch.Tensor) -> torch.Tensor:
    """The tensor a shared-input cast is keyed on: the storage's root tensor.

    Each ``ColwiseParallel`` input hook wraps the same activation in a fresh DTensor view, so wq/wk/wv
    (w1/w3) see different tensor objects over one root; keying on the root lets them share one FP8 copy."""
    return x_local._base if x_local._base is not None else x_local
