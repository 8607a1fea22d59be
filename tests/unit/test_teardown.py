"""Teardown order (parallel/teardown.py): what holds a process group is closed before the group is destroyed.

DDP's C++ Reducer freed after ``destroy_process_group`` held the gloo group's last reference, and gloo's destructor,
run under the GIL, joined a worker thread waiting for the GIL (a 15-minute hang). Here, in one process (gloo, one
rank): ``DistributedRuntime.close`` drops its DDP wrapper (the Reducer is gone, by weak reference) and every other
holder, and is idempotent; ``run_training`` closes the trainer and the runtime before destroying the group on the
error path too, with the failing frames' locals released. The two-rank DDP and pp2 layouts are checked under torchrun
(tests/distributed/test_trainer_torchrun.py, overlap_worker.py)."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
from torch.nn.parallel import DistributedDataParallel as DDP

import meshwright.parallel.teardown as teardown
import meshwright.train.build as build_mod
from meshwright.config import load_train_config
from meshwright.parallel.runtime import DDP_HOLDERS, GROUP_HOLDERS, DistributedRuntime
from meshwright.plan import plan_from_dict
from meshwright.train.local_runtime import LocalRuntime
from meshwright.train.trainer import Trainer

from _train_helpers import MICRO, make_trainer, prepared_corpus


def test_close_drops_ddp_and_every_group_holder_and_is_idempotent(one_rank_group):
    plan = plan_from_dict({"model": "tiny", "seq_len": 16, "global_batch": 2, "micro_batch": 2,
                           "layers": [{"repeat": 4}]})
    rt = DistributedRuntime("tiny", plan, seed=0)
    # one rank builds no DDP (nothing to reduce): wrap the stage as a two-rank plan would (apply_ddp's DDP)
    rt.modules = rt._stage_modules = [DDP(rt.chunks[0])]
    x = torch.randint(0, 256, (2, 17))
    rt.forward_backward([(x[:, :-1], x[:, 1:])])  # the Reducer's buckets are in use
    ddp, reducer, chunk = weakref.ref(rt.modules[0]), weakref.ref(rt.modules[0].reducer), weakref.ref(rt.chunks[0])
    mesh = weakref.ref(rt.meshes.stage_mesh)
    rt.close()
    assert (ddp(), reducer(), chunk(), mesh()) == (None, None, None, None)
    assert rt.closed and not set(vars(rt)) & {*DDP_HOLDERS, *GROUP_HOLDERS}
    rt.close()  # idempotent
    assert rt.closed


def test_trainer_close_drops_optimizer_and_closes_runtime_once_per_call(tmp_path):
    closes = []

    class Recording(LocalRuntime):
        def close(self) -> None:
            closes.append(self)

    trainer = make_trainer(prepared_corpus(tmp_path), tmp_path / "out", runtime_cls=Recording)
    opt = weakref.ref(trainer.optimizer)
    trainer.close()
    trainer.close()
    assert opt() is None and "optimizer" not in vars(trainer)
    assert closes == [trainer.runtime, trainer.runtime]


def test_run_training_closes_trainer_and_runtime_before_destroying_the_group_on_error(tmp_path, monkeypatch):
    """``fit`` fails with a wrapper in its frame: the trainer and the runtime are closed, the frame's locals released
    and the wrapper collected, all before the group is destroyed; the error goes on unchanged."""
    events: list[str] = []
    held: list[weakref.ref] = []

    class Wrapper(torch.nn.Module):  # stands in for DDP: alive only through the failing frame
        pass

    class Recording(LocalRuntime):
        def close(self) -> None:
            events.append("runtime.close")

    def build_runtime(job, **_options):
        return Recording(build_mod.build_model(job.model, seed=0))

    def failing_fit(self, *args, **kwargs):
        wrapper = Wrapper()
        held.append(weakref.ref(wrapper))
        raise RuntimeError("boom in step 3")

    trainer_close = Trainer.close

    def recording_close(self) -> None:
        events.append("trainer.close")
        trainer_close(self)

    def destroy() -> None:
        events.append(f"destroy (wrapper alive: {held[0]() is not None})")

    monkeypatch.setattr(build_mod, "build_runtime", build_runtime)
    monkeypatch.setattr(Trainer, "fit", failing_fit)
    monkeypatch.setattr(Trainer, "close", recording_close)
    monkeypatch.setattr(teardown, "destroy_process_group", destroy)
    cfg = load_train_config({"model": MICRO, "data": {"path": str(prepared_corpus(tmp_path))}, "seq_len": 32,
                             "global_batch": 8, "micro_batch": 4, "steps": 2, "warmup_steps": 1, "out_dir": str(tmp_path / "run"),
                             "progress": False, "energy": False})
    with pytest.raises(RuntimeError, match="boom in step 3"):
        build_mod.run_training(cfg)
    # the trainer closes its runtime, and shutdown closes the runtime again (idempotent), then the group goes
    assert events == ["trainer.close", "runtime.close", "runtime.close", "destroy (wrapper alive: False)"]


def test_release_frames_clears_chained_exceptions_frames():
    class Holder:
        pass

    refs = []

    def inner():
        h = Holder()
        refs.append(weakref.ref(h))
        raise KeyError("inner")

    def outer():
        try:
            inner()
        except KeyError:
            raise ValueError("outer") from None  # __context__ keeps the inner traceback (PeerLost does this)

    with pytest.raises(ValueError) as info:
        outer()
    gc.collect()
    assert refs[0]() is not None  # the chained traceback keeps it
    teardown.release_frames(info.value)
    gc.collect()
    assert refs[0]() is None
