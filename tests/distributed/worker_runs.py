"""Several torchrun worker scripts in one launch: each launch costs ~12 CPU-s of startup (torchrun's agent and every
rank importing torch and meshwright) before a worker does anything, so workers of the same world size share one launch.

    torchrun ... tests/distributed/worker_runs.py state_bytes_worker.py OUT.json :: coat_fsdp_worker.py OUT CKPT

Runs are separated by ``::``; each is a worker script of this directory and its arguments. The script's ``main()``
runs with ``sys.argv`` as a launch of that script alone would see it, from the torch RNG state a fresh process starts
with; what a run compiled is reset after it. The runs share the launch's one process group (a worker's own
``dist.init_process_group`` finds it made, its ``dist.destroy_process_group()`` is left to the launch's end):
destroying the default group between runs would free what a run left after its groups (parallel/teardown.py: a gloo
destructor deadlocked so) and restart c10d's group names at 0, so DTensor specs torch cached in one run (equal meshes,
their group names) would name another run's groups, or none. All ranks have finished run i when run i+1 starts (a
barrier). The first failing run ends the launch with its exit code and traceback. Each rank prints
``worker_runs: rank R run I (SCRIPT) exit C`` after each run."""

from __future__ import annotations

import gc
import importlib.util
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist

SEP = "::"
HERE = Path(__file__).resolve().parent
GROUP_TIMEOUT = timedelta(seconds=300)  # >= every worker's own (60-120 s); only a hang waits it out


def split_runs(argv: list[str]) -> list[list[str]]:
    """``a.py x :: b.py y z`` -> [[a.py, x], [b.py, y, z]]."""
    runs, current = [], []
    for arg in [*argv, SEP]:
        if arg != SEP:
            current.append(arg)
            continue
        if not current:
            raise SystemExit(f"worker_runs: empty run in {argv}")
        runs.append(current)
        current = []
    return runs


def one_group() -> tuple[Callable[..., None], Callable[..., None]]:
    """``dist.init_process_group`` / ``dist.destroy_process_group`` for the runs: the launch's one default group is
    every run's. A worker's init finds it made; its destroy of the default group is left to the launch's end."""
    real_destroy = dist.destroy_process_group

    def init(*args: Any, **kwargs: Any) -> None:
        if not dist.is_initialized():
            raise RuntimeError("worker_runs: the launch's process group is gone")

    def destroy(group: Any = None) -> None:
        if group is not None:  # a subgroup a worker ends itself: as in its own launch
            real_destroy(group)

    return init, destroy


def load(script: str) -> Any:
    """The worker module ``script`` (a file of this directory), under its own name, not as ``__main__``."""
    path = HERE / script
    spec = importlib.util.spec_from_file_location(path.stem, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"worker_runs: script={script!r} is not a worker of {HERE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[path.stem] = module
    spec.loader.exec_module(module)
    return module


def run_all(argv: list[str]) -> int:
    runs = split_runs(argv)
    from parity_lib import pg_timeout  # the workers' own timeouts are stretched by the load: this one alike

    dist.init_process_group("gloo", timeout=pg_timeout(GROUP_TIMEOUT.total_seconds()))
    rank = dist.get_rank()
    fresh_rng = torch.get_rng_state()
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    init, destroy = one_group()
    for i, (script, *args) in enumerate(runs):
        torch.set_rng_state(fresh_rng)
        code = 0
        try:
            module = load(script)
            with mock.patch.object(sys, "argv", [str(HERE / script), *args]), \
                    mock.patch.object(dist, "init_process_group", init), \
                    mock.patch.object(dist, "destroy_process_group", destroy):
                module.main()
        except SystemExit as e:  # a worker that exits: its code, as its own launch would
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the launch ends with the traceback, as the worker's own would
            traceback.print_exc()
            code = 1
        module = None
        gc.collect()  # what the run held is freed while its groups live (parallel/teardown.py: not after them)
        if "torch._dynamo" in sys.modules:  # what a run compiled stays its own (recompile limits, guards)
            torch._dynamo.reset()
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)
        print(f"worker_runs: rank {rank} run {i} ({script}) exit {code}", flush=True)
        if code:
            return code
        dist.barrier()  # every rank is done with run i (its files written) before run i+1 starts
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))  # the workers import parity_lib
    from meshwright.parallel.mesh import exit_worker

    exit_worker(run_all(sys.argv[1:]))
