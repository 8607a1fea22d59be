"""Several `meshwright` CLI runs in one torchrun launch: each launch costs ~13 s of CPU (torchrun's agent and every
rank importing torch and meshwright) before the run does anything, so tests that need a few short runs on the same
ranks share one launch.

    torchrun ... tests/distributed/cli_runs.py train a.yaml steps=2 :: --env=K=V profile model --model tiny ...

Runs are separated by ``::``; a run's leading ``--env=KEY=VALUE`` arguments set environment variables for it alone,
and ``--copy=SRC:DST`` copies the directory SRC to DST (rank 0, once every rank ended the run before) before it starts.
Each run gets a process group of its own, as a fresh launch would: the CLI destroys its group when it ends, and a group
re-made on the same torchrun store reads the first group's stale addresses (seen: connection refused/reset), so
every run's group lives under a fresh store prefix (what meshwright's init_distributed does for elastic restarts).
All ranks have finished run i when run i+1 starts (a barrier on the new group). The first failing run ends the worker
with its exit code. Each rank prints ``cli_runs: rank R run I exit C at NS`` after each run (NS: ``time.time_ns()``,
the clock of file mtimes, so a test can tell what a later run wrote)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from unittest import mock
from datetime import timedelta
from typing import Callable

import torch.distributed as dist

SEP = "::"


def split_runs(argv: list[str]) -> list[tuple[dict[str, str], list[tuple[str, str]], list[str]]]:
    """``a b :: --env=K=V --copy=S:D c`` -> [({}, [], [a, b]), ({K: V}, [(S, D)], [c])]."""
    runs, current = [], []
    for arg in [*argv, SEP]:
        if arg != SEP:
            current.append(arg)
            continue
        env, copies = {}, []
        while current and current[0].startswith(("--env=", "--copy=")):
            opt, _, spec = current.pop(0).partition("=")
            if opt == "--env":
                key, _, value = spec.partition("=")
                env[key] = value
            else:
                src, _, dst = spec.rpartition(":")
                copies.append((src, dst))
        if not current:
            raise SystemExit(f"cli_runs: empty run in {argv}")
        runs.append((env, copies, current))
        current = []
    return runs


def fresh_group(index: int, timeout: timedelta) -> None:
    """The default process group for run ``index``, on a store prefix no earlier run used."""
    store, rank, world = next(dist.rendezvous("env://", timeout=timeout))
    dist.init_process_group("gloo", store=dist.PrefixStore(f"cli_runs/{index}", store), rank=rank, world_size=world,
                            timeout=timeout)
    dist.barrier()  # every rank is done with the previous run (its files written) before this one starts


def run_all(argv: list[str], timeout: timedelta | None = None,
            around: Callable[[int, Callable[[], int]], int] | None = None) -> int:
    """Run every CLI invocation of ``argv`` in turn; ``around(i, call)`` may wrap run ``i`` (spies, patches).
    ``timeout``: each run's group's; 120 s on a quiet box, stretched by the load (tests/patience.py)."""
    from meshwright.cli import main
    from parity_lib import pg_timeout

    timeout = timeout if timeout is not None else pg_timeout(120)

    for i, (env, copies, args) in enumerate(split_runs(argv)):
        with mock.patch.dict(os.environ, env):  # this run's environment only
            fresh_group(i, timeout)
            rank = dist.get_rank()
            if copies:
                if rank == 0:
                    for src, dst in copies:
                        shutil.copytree(src, dst)
                dist.barrier()
            code = around(i, lambda: main(args)) if around else main(args)
        if dist.is_initialized():  # a command that leaves its group (none of meshwright's should)
            dist.destroy_process_group()
        print(f"cli_runs: rank {rank} run {i} exit {code} at {time.time_ns()}", flush=True)
        if code:
            return code
    return 0


if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    exit_worker(run_all(sys.argv[1:]))
