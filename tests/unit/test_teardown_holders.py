"""Teardown of the holders test_teardown.py does not cover: DeepSpeed's engine and torch's DTensor caches.

``DeepSpeedRuntime.close`` must call DeepSpeed's ``engine.destroy()`` (deepspeed 0.19: it releases the ZeRO
optimizer's state and buffers) while the group is still up, and drop the engine and its ZeRO optimizer (they hold the
data-parallel group) before ``destroy_process_group``: checked with a stand-in engine for the order, and with a real
engine on CPU (one gloo rank). torch's DTensor caches (sharding propagation, redistribute plans, mesh topology) key
or hold DTensorSpecs and so the DeviceMesh and its groups: after every DTensor is gone they alone kept a mesh alive,
until ``teardown.close_all`` clears them (checked on a bare mesh and on a runtime's FSDP2 mesh)."""

from __future__ import annotations

import gc
import os
import weakref

import pytest
import torch
import torch.distributed as dist

import meshwright.parallel.teardown as teardown
from meshwright.plan import plan_from_dict


def _recording_destroy(monkeypatch, events: list[str], **refs: weakref.ref) -> None:
    real = teardown.destroy_process_group

    def destroy() -> None:
        alive = sorted(name for name, ref in refs.items() if ref() is not None)
        events.append(f"destroy (alive: {alive})")
        real()

    monkeypatch.setattr(teardown, "destroy_process_group", destroy)


def test_deepspeed_close_destroys_the_engine_before_the_group(one_rank_group, monkeypatch):
    from meshwright.parallel.deepspeed_backend import DeepSpeedRuntime

    events: list[str] = []

    class Engine:  # DeepSpeedEngine's teardown surface: destroy() releases what its ZeRO optimizer holds
        def __init__(self) -> None:
            self.optimizer = torch.nn.Module()

        def destroy(self) -> None:
            events.append(f"engine.destroy (group up: {dist.is_initialized()})")

    rt = DeepSpeedRuntime.__new__(DeepSpeedRuntime)
    rt.engine, rt.model = Engine(), torch.nn.Linear(2, 2)
    rt._params = list(rt.model.parameters())
    engine, zero_opt, model = weakref.ref(rt.engine), weakref.ref(rt.engine.optimizer), weakref.ref(rt.model)
    _recording_destroy(monkeypatch, events, engine=engine, zero_opt=zero_opt, model=model)
    teardown.shutdown(rt)
    assert events == ["engine.destroy (group up: True)", "destroy (alive: [])"]
    rt.close()  # idempotent: no second destroy
    assert len(events) == 2


@pytest.mark.slow
def test_a_real_deepspeed_engine_is_destroyed_and_gone_before_the_group(one_rank_group, monkeypatch):
    """The consumer: deepspeed's own engine on CPU (ZeRO-1, one gloo rank), one training step, then the teardown."""
    pytest.importorskip("deepspeed")
    from meshwright.parallel.deepspeed_backend import DeepSpeedRuntime

    for k, v in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_PORT", "29555")):
        monkeypatch.setenv(k, os.environ.get(k, v))
    plan = plan_from_dict({"model": "tiny", "seq_len": 16, "global_batch": 2, "micro_batch": 2,
                           "layers": [{"repeat": 4, "zero": 1}]})
    rt = DeepSpeedRuntime("tiny", plan, seed=0)
    rt.build_optimizer(lambda groups: torch.optim.AdamW(groups, lr=1e-3))
    x = torch.randint(0, 256, (2, 17))
    rt.forward_backward([(x[:, :-1], x[:, 1:])])
    events: list[str] = []
    cls = type(rt.engine)
    real_destroy = cls.destroy

    def destroy(self) -> None:
        events.append(f"engine.destroy (group up: {dist.is_initialized()})")
        real_destroy(self)

    monkeypatch.setattr(cls, "destroy", destroy)
    engine, zero_opt = weakref.ref(rt.engine), weakref.ref(rt.engine.optimizer)
    assert type(zero_opt()).__name__ == "DeepSpeedZeroOptimizer"
    _recording_destroy(monkeypatch, events, engine=engine, zero_opt=zero_opt)
    teardown.shutdown(rt)
    # close()'s destroy(), then DeepSpeed's own __del__ calls it again as the engine goes: both before the group
    assert events[0] == "engine.destroy (group up: True)" and events[-1] == "destroy (alive: [])"
    assert set(events[:-1]) == {"engine.destroy (group up: True)"}


def test_dtensor_caches_keep_a_mesh_alive_until_close_all_clears_them(one_rank_group):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    w = distribute_tensor(torch.randn(4, 4), mesh, [Shard(0)])
    x = distribute_tensor(torch.randn(4, 4), mesh, [Replicate()])
    (w @ x).sum()
    w.redistribute(mesh, [Replicate()]).full_tensor()
    ref = weakref.ref(mesh)
    del w, x, mesh
    gc.collect()
    assert ref() is not None  # no DTensor is left: torch's caches hold it
    assert teardown.release_dtensor_caches() == ["sharding_prop", "sharding_prop_fast_path", "tensor_meta",
                                                 "redistribute", "mesh_topology"]  # every one this torch has
    teardown.close_all()
    assert ref() is None


def test_an_fsdp2_module_leaves_no_mesh_behind_after_shutdown(one_rank_group, monkeypatch):
    """As a zero-3 layout shards (parallel/data_parallel.py): fully_shard on a mesh, a step, the module closed
    (dropped, as a runtime's close drops it), then ``shutdown``: the mesh is gone before the group."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    holder = type("Holder", (), {})()
    mesh = init_device_mesh("cpu", (1,))
    holder.model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    fully_shard(holder.model, mesh=mesh)
    holder.model(torch.randn(4, 8)).square().sum().backward()
    holder.close = lambda: holder.__dict__.pop("model", None)
    events: list[str] = []
    _recording_destroy(monkeypatch, events, mesh=weakref.ref(mesh))
    del mesh
    teardown.shutdown(holder)
    assert events == ["destroy (alive: [])"]
