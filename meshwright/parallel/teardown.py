"""Tear a process group down in the one safe order: close what holds it, collect cycles, then destroy it.

Why an order: DDP's C++ Reducer (and a pipeline stage, an FSDP2 module, a DeviceMesh, a ZeRO-1 optimizer, a gloo
group of the async checkpointer or of preemption) keeps a reference to its ProcessGroup. Freed after
``destroy_process_group`` -- at a function's return, at exit, or when an exception holding its frames is dropped --
such an object held the group's last reference, and gloo's destructor, run under the GIL, joined a worker thread that
waited for the GIL: a deadlock (seen as a 15-minute hang of a unit run). Closed first, the group's last reference is
c10d's own registry, which ``destroy_process_group`` shuts down and drops itself.
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


def close_all(*objects: Closable | None) -> None:
    """``close()`` each object (skipping None) in order, then collect reference cycles (a Reducer in a cycle is
    freed only by the collector). Every close runs even if one fails; the first failure is raised afterwards."""
    first: BaseException | None = None
    for obj in objects:
        if obj is None:
            continue
        try:
            obj.close()
        except BaseException as exc:  # noqa: BLE001 - the others must still let go of their groups
            first = first or exc
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
