"""`meshwright train` on every torchrun rank with fused AdamW (what CUDA gets; it runs on CPU too), so ranks whose
parameters are plain tensors may overlap the loss read-back with the next step; a short gloo timeout turns a
collective-order mismatch between ranks into a failure instead of a hang. The arguments are the CLI's
(``train ...``); several runs may share the launch (``::`` between them, tests/distributed/cli_runs.py), each with a
process group of its own. After each run every rank prints the steps it overlapped (``rank R run I overlapped [...]``);
``--env=MESHWRIGHT_TEST_NO_OVERLAP=1`` before a run's arguments makes it read every step back at once (the reference
run). Every run also reports, when its process group is destroyed, which of its runtime's group holders are still
alive (``rank R run I teardown alive [...]``; parallel/teardown.py): DDP wrappers and their C++ Reducers, pipeline
schedules and stages, the stage modules, the meshes, the optimizer, and the holder attributes still on the runtime.
Used by test_trainer_torchrun.py."""

import os
import sys

import torch.distributed as dist

import meshwright.train.trainer as trainer_mod
from cli_runs import run_all


def watch_teardown(run: dict[str, int]) -> None:
    """Weak references to what each run's runtime builds that holds a process group, checked (and printed) at the run's
    ``destroy_process_group``: every one must be gone by then. ``run``: the current run's rank and index."""
    import weakref

    import meshwright.parallel.runtime as runtime_mod
    import meshwright.train.build as build_mod
    from meshwright.parallel.teardown import alive
    from torch.nn.parallel import DistributedDataParallel as DDP

    refs: dict[str, weakref.ref] = {}
    built: list[weakref.ref] = []
    build_runtime, build_schedule, fit, destroy = (build_mod.build_runtime, runtime_mod.build_schedule,
                                                   trainer_mod.Trainer.fit, dist.destroy_process_group)

    def spy_build_runtime(job, **options):
        rt = build_runtime(job, **options)
        built.append(weakref.ref(rt))
        for i, mod in enumerate(rt.modules):
            refs[f"stage_module{i}"] = weakref.ref(mod)
            if isinstance(mod, DDP):
                refs[f"DDP{i}"], refs[f"Reducer{i}"] = weakref.ref(mod), weakref.ref(mod.reducer)
        refs["meshes"] = weakref.ref(rt.meshes)
        return rt

    def spy_build_schedule(*args, **kwargs):
        sched = build_schedule(*args, **kwargs)
        refs[f"schedule{len(refs)}"] = weakref.ref(sched)
        for j, stage in enumerate(getattr(sched, "_stages", None) or [sched._stage]):
            refs[f"PipelineStage{j}"] = weakref.ref(stage)
        return sched

    def spy_fit(self, *args, **kwargs):
        refs["optimizer"] = weakref.ref(self.optimizer)
        return fit(self, *args, **kwargs)

    def spy_destroy(*args, **kwargs):
        if refs:
            rt = built[0]() if built else None
            left = [f"runtime.{k}" for k in (*runtime_mod.DDP_HOLDERS, *runtime_mod.GROUP_HOLDERS)
                    if rt is not None and k in vars(rt)]
            kinds = sorted({k.rstrip("0123456789") for k in refs})
            print(f"rank {run['rank']} run {run['index']} teardown alive {alive(refs) + left} of {kinds}", flush=True)
            refs.clear()
            built.clear()
        return destroy(*args, **kwargs)

    build_mod.build_runtime, runtime_mod.build_schedule = spy_build_runtime, spy_build_schedule
    trainer_mod.Trainer.fit, dist.destroy_process_group = spy_fit, spy_destroy

if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    trainer_mod.fast_adamw_kwargs = lambda device: {"fused": True}
    may_overlap = trainer_mod.Trainer.may_overlap
    current = {"rank": -1, "index": -1}
    watch_teardown(current)

    def one_run(index, call):
        overlapped: list[int] = []

        def spy(self, step: int) -> bool:
            if os.environ.get("MESHWRIGHT_TEST_NO_OVERLAP") == "1":
                return False
            ok = may_overlap(self, step)
            if ok:
                overlapped.append(step)
            return ok

        trainer_mod.Trainer.may_overlap = spy
        rank = dist.get_rank()
        current.update(rank=rank, index=index)
        code = call()
        print(f"rank {rank} run {index} overlapped {overlapped}", flush=True)
        return code

    from parity_lib import pg_timeout

    exit_worker(run_all(sys.argv[1:], timeout=pg_timeout(60), around=one_run))
