"""Several torchrun worker scripts in one launch: each launch costs ~12 CPU-s of startup (torchrun's agent and every rank
importing torch and meshwright) before a worker does anything, so workers of the same world size share one launch.

    torchrun ... tests/distributed/worker_runs.py state_bytes_worker.py OUT.json :: coat_fsdp_worker.py OUT CKPT

Runs are separated by ``::``; each is a worker script of this directory and its arguments. The script's ``main()`` runs
with ``sys.argv`` as a launch of that script alone would see it, from the same torch RNG state a fresh process starts
with. Each run gets a process group of its own, as a fresh launch would: its own ``dist.init_process_group`` call is
given a store under a fresh prefix (a group re-made unprefixed on the same torchrun store reads the previous group's
stale addresses; tests/distributed/cli_runs.py), and the group it leaves is destroyed after it. The first failing run
ends the launch with its exit code and traceback. Each rank prints ``worker_runs: rank R run I exit C`` after each
run."""

from __future__ import annotations

import gc
import importlib.util
import sys
import traceback
from datetime import timedelta
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist

SEP = "::"
HERE = Path(__file__).resolve().parent


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


def prefixed_init(index: int):
    """``dist.init_process_group`` for run ``index``: without a store of the caller's, the env:// store under a prefix
    no earlier run used."""
    real = dist.init_process_group

    def init(backend=None, *args, store=None, **kwargs):
        if store is None and not args and "init_method" not in kwargs:
            timeout = kwargs.get("timeout") or timedelta(seconds=120)
            base, rank, world = next(dist.rendezvous("env://", timeout=timeout))
            store = dist.PrefixStore(f"worker_runs/{index}", base)
            kwargs.update(rank=rank, world_size=world)
        return real(backend, *args, store=store, **kwargs)

    return init


def load(script: str):
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
    fresh_rng = torch.get_rng_state()
    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    rank = "?"
    for i, (script, *args) in enumerate(split_runs(argv)):
        torch.set_rng_state(fresh_rng)
        code = 0
        try:
            module = load(script)
            with mock.patch.object(sys, "argv", [str(HERE / script), *args]), \
                    mock.patch.object(dist, "init_process_group", prefixed_init(i)):
                module.main()
            rank = dist.get_rank() if dist.is_initialized() else rank
        except SystemExit as e:  # a worker that exits: its code, as its own launch would
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001 - the launch ends with the traceback, as the worker's own would
            traceback.print_exc()
            code = 1
        if dist.is_initialized():  # a worker that leaves its group (hf_load_worker does)
            rank = dist.get_rank()
            dist.destroy_process_group()
        torch.set_default_dtype(dtype)
        torch.set_num_threads(threads)
        torch.set_grad_enabled(True)
        gc.collect()
        print(f"worker_runs: rank {rank} run {i} ({script}) exit {code}", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    import os

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.path.insert(0, str(HERE))  # the workers import parity_lib
    from meshwright.parallel.mesh import exit_worker

    exit_worker(run_all(sys.argv[1:]))
