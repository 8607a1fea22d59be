"""CPU time of idle gloo process groups: what the groups that long test launches keep up cost each rank (results/ci_threads.md).

    torchrun --standalone --nproc-per-node=2 benchmarks/idle_gloo_groups.py N MODE

creates N 2-rank gloo groups, then sleeps 10 s and prints the rank's thread count and the user/system CPU seconds
of those 10 idle seconds. MODE: ``keep`` (the groups stay up), ``destroy`` (``destroy_process_group`` on each and
the references dropped), ``destroy-held`` (destroyed, references kept: the threads stay until the object is freed).
"""

from __future__ import annotations

import os
import sys
import time

import torch.distributed as dist

from meshwright.parallel.teardown import shutdown


def main() -> None:
    dist.init_process_group("gloo")
    n, mode = int(sys.argv[1]), sys.argv[2]
    groups = [dist.new_group([0, 1]) for _ in range(n)]
    if mode in ("destroy", "destroy-held"):
        for g in groups:
            dist.destroy_process_group(g)
    if mode == "destroy":
        groups.clear()
    dist.barrier()
    t0 = os.times()
    time.sleep(10)
    t1 = os.times()
    threads = len(os.listdir(f"/proc/{os.getpid()}/task"))
    print(f"rank {dist.get_rank()} groups {n} mode {mode} threads {threads} "
          f"idle_10s_user {t1.user - t0.user:.2f} idle_10s_sys {t1.system - t0.system:.2f}", flush=True)
    shutdown()  # the default group, in teardown.py's order


if __name__ == "__main__":
    main()
