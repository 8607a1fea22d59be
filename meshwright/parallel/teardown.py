"""Tear a process group down in the one safe order: close what holds it, collect cycles, then destroy it.

Why an order: DDP's C++ Reducer (and a pipeline stage, an FSDP2 module, a DeviceMesh, a ZeRO-1 optimizer, a gloo
group of the async checkpointer or of preemption) keeps a reference to its ProcessGroup. Freed after
``destroy_process_group`` -- at a function's return, at exit, or when an exception holding its frames is dropped --
such an object held the group's last reference, and gloo's destructor, run under the GIL, joined a worker thread that
waited for the GIL: a deadlock (seen as a 15-minute hang of a unit run). Closed first, the group's last reference is
c10d's own registry, which ``destroy_process_group`` shuts down and drops itself. torch's DTensor caches hold meshes
past their DTensors: ``close_all`` clears them (``release_dtensor_caches``).
"""

from __future__ import annotations

import gc
import sys
import traceback
from typing import Any, Protocol


class Closable(Protocol):
    def close(self) -> None: ...


def release_frames(exc: BaseException | None) -> None:
    """Clear the locals of the finished frames of ``exc``'s traceback and of the exceptions it chains (``__cause__``,
    ``__context__``): a frame of ``DDP.forward`` or ``Trainer.fit`` there keeps the wrapper alive past the group's
    teardown while the exception propagates. The traceback still prints (file, line, code); frames still running
    (the caller's) are left as they are."""
    seen: set[int] = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        traceback.clear_frames(e.__traceback__)
        todo += [e.__cause__, e.__context__]


def release_dtensor_caches() -> list[str]:
    """Clear torch's DTensor caches whose keys or values hold a DeviceMesh (and through it its process groups): the
    sharding propagation caches (Python, this thread's; and the C++ fast path's), the tensor-meta propagation cache,
    the redistribute planners and transform plans, and the mesh topology cache. After a runtime's close, with every
    DTensor gone, they alone kept its meshes alive (measured, torch 2.13, by weak reference: a 1-device mesh after one
    matmul and one redistribute stayed alive while any of the fast-path, transform-plan, planner or topology caches
    was left; the Python and tensor-meta caches key DTensorSpecs too, and go alike; an FSDP2 module's mesh the
    same), and a mesh freed after ``destroy_process_group`` is the late group release this module exists to prevent.
    Each is a private torch API (``torch.distributed.tensor.debug._clear_sharding_prop_cache`` clears only the first
    two): one a torch version lacks is skipped. The Python cache is per thread: this thread's is cleared. Returns the
    names of those cleared. The cost: the process's next DTensor op recomputes them."""
    cleared: list[str] = []
    if "torch.distributed.tensor" not in sys.modules:  # no DTensor was ever made: nothing cached, nothing imported
        return cleared

    def clear(name: str, fn: Any) -> None:
        try:
            fn()
            cleared.append(name)
        except (AttributeError, ImportError, RuntimeError):
            pass

    def sharding_prop() -> None:
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()

    def fast_path() -> None:
        import torch

        torch._C._clear_DTensor_sharding_propagator_cache()

    def tensor_meta() -> None:
        from torch.distributed.tensor._sharding_prop import ShardingPropagator

        ShardingPropagator._propagate_tensor_meta_cached.cache_clear()

    def redistribute() -> None:
        from torch.distributed.tensor import _redistribute

        _redistribute._gen_transform_infos.cache_clear()
        _redistribute.clear_redistribute_planner_cache()

    def topology() -> None:
        from torch.distributed.tensor._collective_utils import MeshTopoInfo

        MeshTopoInfo.build_from_mesh.cache_clear()

    for name, fn in (("sharding_prop", sharding_prop), ("sharding_prop_fast_path", fast_path),
                     ("tensor_meta", tensor_meta), ("redistribute", redistribute), ("mesh_topology", topology)):
        clear(name, fn)
    return cleared


def close_all(*objects: Closable | None) -> None:
    """``close()`` each object (skipping None) in order, clear torch's DTensor caches (``release_dtensor_caches``),
    then collect reference cycles (a Reducer in a cycle is freed only by the collector). Every close runs even if one
    fails; the first failure is raised afterwards."""
    first: BaseException | None = None
    for obj in objects:
        if obj is None:
            continue
        try:
            obj.close()
        except BaseException as exc:  # noqa: BLE001 - the others must still let go of their groups
            first = first or exc
    release_dtensor_caches()
    gc.collect()
    if first is not None:
        raise first


def destroy_process_group() -> None:
    """Destroy the default group (local teardown, no barrier: a rank that failed does not wait on the others) unless
    none is up, or an abandoned checkpoint write still runs in its collectives (train/async_checkpoint.py: the process
    then ends without teardown)."""
    import torch.distributed as dist

    ckpt = sys.modules.get("meshwright.train.async_checkpoint")  # loaded only by a run that checkpoints
    if ckpt is not None and ckpt.abandoned_write_running():
        return
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def shutdown(*objects: Closable | None, exc: BaseException | None = None) -> None:
    """The teardown every path that destroys the group takes: ``release_frames(exc)`` (the error on its way out, if
    any), ``close_all(objects)`` (callers list DDP's holders first: the trainer, then its runtime), then destroy."""
    release_frames(exc)
    try:
        close_all(*objects)
    finally:
        destroy_process_group()


def alive(refs: dict[str, Any]) -> list[str]:
    """The names of ``refs`` (weak references) whose object is still alive, after a collection: tests and benchmarks
    check a runtime's group holders with it before the group goes."""
    gc.collect()
    return sorted(name for name, ref in refs.items() if ref() is not None)
