"""Data parallelism over a stage's dp ranks: DDP, FSDP2 (ZeRO-3 / ZeRO-2-like / HSDP), ZeRO-1.

ZeRO levels map onto torch as follows:
- zero 0: DDP (whole stage module, when every layer is replicated the same way), or a bucketed
  all-reduce of the local gradients over the layer's dp group when layers differ (layer-wise plans,
  tensor-parallel DTensor parameters, which DDP does not handle);
- zero 1: DDP + ``ZeroRedundancyOptimizer`` (optimizer states sharded over the dp group);
- zero 2: FSDP2 ``fully_shard(reshard_after_forward=False)`` (gradients + optimizer states sharded,
  parameters kept unsharded between forward and backward);
- zero 3: FSDP2 ``fully_shard`` (parameters too); with a 2-D (replicate, shard) mesh this is HSDP.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterable

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP


def apply_fsdp(module: nn.Module, dp_mesh: DeviceMesh, zero: int, mp_policy: Any = None) -> nn.Module:
    """ZeRO-3 (``zero=3``) or ZeRO-2-like (``zero=2``) sharding of ``module`` over ``dp_mesh``; ``mp_policy``
    is FSDP2's ``MixedPrecisionPolicy`` (None: no casts, fp32)."""
    extra = {"mp_policy": mp_policy} if mp_policy is not None else {}
    fully_shard(module, mesh=dp_mesh, reshard_after_forward=(zero == 3), **extra)
    return module


def apply_ddp(module: nn.Module, group: dist.ProcessGroup, device: torch.device) -> DDP:
    """Replicate ``module`` over ``group`` (gradients all-reduced and averaged in buckets).

    ``gradient_as_bucket_view``: each ``.grad`` is a view into DDP's reduction bucket, so the stage holds one fp32
    gradient buffer (4 B/param), as the planner counts and torchtitan/Megatron keep; without it the reducer's buckets
    are a second copy (+4 B/param, measured in tests/distributed/state_bytes_worker.py). The views survive only if
    gradients are zeroed in place between steps (``DistributedRuntime.zero_grad``): set to None, the next
    ``no_sync`` microbatch allocates fresh gradients beside the buckets. The first step's too: DDP makes ``.grad`` a
    bucket view only where it is defined (the reducer's ``initialize_bucket_views`` at construction, else the first
    synchronised backward), so a first ``no_sync`` microbatch allocated gradients of its own beside the buckets
    (+4 B/param through step 1's backward, measured in tests/distributed/state_bytes_worker.py: 3.6 B/param at the
    walk's hooks). Zeroed gradients handed to DDP here become the bucket views before any activation exists."""
    for p in module.parameters():
        if p.requires_grad and p.grad is None:
            p.grad = torch.zeros_like(p)
    ids = [device.index] if device.type == "cuda" else None
    return DDP(module, process_group=group, device_ids=ids, gradient_as_bucket_view=True)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def all_reduce_grads(params: Iterable[nn.Parameter], group: dist.ProcessGroup, scale: float) -> None:
    """Sum the local gradients of replicated ``params`` over ``group`` in one flat bucket, times ``scale``.

    Used where DDP cannot go: DTensor (tensor-parallel) parameters and layer-wise plans whose layers
    each have their own dp group. ``scale`` folds in the 1/dp average and the layer-wise correction.
    """
    grads = [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


def zero1_optimizer(optimizer: torch.optim.Optimizer, group: dist.ProcessGroup) -> ZeroRedundancyOptimizer:
    """Rebuild ``optimizer`` as a ``ZeroRedundancyOptimizer`` (optimizer states sharded over ``group``)."""
    cls = type(optimizer)
    accepted = set(inspect.signature(cls.__init__).parameters)
    defaults = {k: v for k, v in optimizer.defaults.items() if k in accepted and k != "params"}
    groups = [{k: v for k, v in g.items() if k == "params" or k in accepted} for g in optimizer.param_groups]
    zero = ZeroRedundancyOptimizer(groups, optimizer_class=cls, process_group=group, **defaults)
    return zero


def sharded_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of optimizer state held on this rank (local shards only): checks ZeRO's saving."""
    opt = optimizer.optim if isinstance(optimizer, ZeroRedundancyOptimizer) else optimizer
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if torch.is_tensor(v) and v.dim() > 0:
                loc = _local(v)
                total += loc.numel() * loc.element_size()
    return total


