"""Data parallelism over a stage's dp ranks: DDP, FSDP2 (ZeRO-3 / ZeRO-2-like / HSDP), ZeRO-1.

ZeRO levels map onto torch as follows:
- zero 0: DDP (whole stage module, when every layer is replicated the same way), or a bucketed
  all-reduce of the local gradients over the layer's dp group when layers differ (layer-wise plans,
  tensor-parallel DTensor parameters, which DDP does not handle);
- zero 1: DDP + ``ZeroRedundancyOptimizer`` (optimizer states sharded over the dp group, whole parameters per rank;
  checkpointed through DCP by parallel/zero1_state.py, each rank writing the states of the parameters it owns);
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
    ddp = DDP(module, process_group=group, device_ids=ids, gradient_as_bucket_view=True)
    ddp._meshwright_synced = False  # type: ignore[attr-defined]  # a synchronised forward ran (rebuild_buckets)
    ddp.register_forward_pre_hook(_note_synced_forward)
    return ddp


def _note_synced_forward(module: DDP, _args: Any) -> None:
    """DDP fills its bucket-rebuild order during the first synchronised backward: note that one ran."""
    if torch.is_grad_enabled() and module.require_backward_grad_sync:
        module._meshwright_synced = True  # type: ignore[attr-defined]


@torch.no_grad()
def rebuild_buckets(module: DDP) -> bool:
    """Rebuild DDP's buckets now, between steps with the gradients zeroed, without holding the old buckets beside
    the new ones: call on every rank (the rebuild broadcasts rank 0's bucket order). True where it rebuilt.

    DDP rebuilds its buckets once, in the first forward after a synchronised backward (in backward-ready order), and
    its reducer allocates the new buckets while it still holds the old ones: +4 B per parameter at step 2's forward
    (measured in tests/distributed/state_bytes_worker.py, where activations are not there to hide it). Here the
    gradients are zero, so each is replaced by a zero that holds no storage (a broadcast scalar) and the old buckets'
    storage is released (resized to 0, as FSDP2 frees its unsharded parameters) before the same ``_rebuild_buckets``
    DDP would call; the reducer copies the zeros into the new buckets and makes the gradients views of them. The
    same buckets, so the same reductions. Where no rebuild is due the old buckets and views are restored."""
    if module._has_rebuilt_buckets or not getattr(module, "_meshwright_synced", False):
        return False
    params = [p for p in module.parameters() if p.requires_grad and p.grad is not None]
    if any(bool(p.grad.any()) for p in params):  # not zeroed: DDP's own rebuild copies them (one pass, once a run)
        return False
    views = [p.grad for p in params]
    storages = {id(st): st for st in (g.untyped_storage() for g in views)}
    sizes = {k: st.nbytes() for k, st in storages.items()}
    for p in params:
        p.grad = torch.zeros((), dtype=p.dtype, device=p.device).expand(p.shape)
    for st in storages.values():
        st.resize_(0)
    rebuilt = bool(module.reducer._rebuild_buckets())
    if rebuilt:
        module._has_rebuilt_buckets = True
    else:  # nothing was due (no backward completed): the old buckets back, zeroed, and their views as gradients
        for k, st in storages.items():
            st.resize_(sizes[k])
        for p, g in zip(params, views):
            p.grad = g
            g.zero_()
    return rebuilt


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def all_reduce_grads(params: Iterable[Any], group: dist.ProcessGroup, scale: float, _local_grads: bool = False) -> None:
    """Sum the local gradients of replicated ``params`` over ``group`` in one flat bucket, times ``scale``.

    Used where DDP cannot go: DTensor (tensor-parallel) parameters and layer-wise plans whose layers
    each have their own dp group. ``scale`` folds in the 1/dp average and the layer-wise correction.
    ``_local_grads``: ``params`` are already the local gradients (``all_reduce_grad_groups``).
    """
    grads = list(params) if _local_grads else [_local(p.grad) for p in params if p.grad is not None]
    if not grads:
        return
    _reduce_into(torch.cat([g.reshape(-1) for g in grads]), grads, group, scale)


def _reduce_into(flat: torch.Tensor, grads: list[torch.Tensor], group: dist.ProcessGroup, scale: float) -> None:
    """All-reduce ``flat`` (the gradients ``grads`` concatenated), scale it and copy it back into them."""
    dist.all_reduce(flat, group=group)
    flat.mul_(scale)
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n


@torch.no_grad()
def all_reduce_grad_groups(groups: Iterable[tuple[Iterable[nn.Parameter], dist.ProcessGroup, float]]) -> None:
    """``all_reduce_grads`` of every (params, group, scale) in turn, each group's gradients flattened into one
    buffer of the largest group's size (per dtype and device) instead of a fresh flat tensor per group: the
    collective sees the same contiguous values, so the same sums, but the backend may still hold the previous
    group's tensor while the next is concatenated (gloo releases a finished work's tensors from its own thread:
    measured, two tiny-par blocks' gradients held at once in some steps, one in others). One buffer, freed at the
    end, bounds the copy at the largest group's gradients, as ``cost_model.reduce_copy_bytes`` counts it."""
    work = []
    for params, group, scale in groups:
        grads = [_local(p.grad) for p in params if p.grad is not None]
        if grads:
            work.append((grads, group, scale))
    sizes: dict[tuple, int] = {}
    for grads, _, _ in work:
        key = (grads[0].dtype, grads[0].device)
        if all((g.dtype, g.device) == key for g in grads):
            sizes[key] = max(sizes.get(key, 0), sum(g.numel() for g in grads))
    buffers = {key: torch.empty(n, dtype=key[0], device=key[1]) for key, n in sizes.items()}
    for grads, group, scale in work:
        key = (grads[0].dtype, grads[0].device)
        if key not in buffers or any((g.dtype, g.device) != key for g in grads):
            all_reduce_grads(grads, group, scale, _local_grads=True)
            continue
        n = sum(g.numel() for g in grads)
        flat = buffers[key][:n]
        torch.cat([g.reshape(-1) for g in grads], out=flat)
        _reduce_into(flat, grads, group, scale)


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


