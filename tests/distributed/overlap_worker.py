"""`meshwright train` on every torchrun rank with fused AdamW (what CUDA gets; it runs on CPU too), so ranks whose
parameters are plain tensors may overlap the loss read-back with the next step; a short gloo timeout turns a
collective-order mismatch between ranks into a failure instead of a hang. The arguments are the CLI's
(``train ...``); several runs may share the launch (``::`` between them, tests/distributed/cli_runs.py), each with a
process group of its own. After each run every rank prints the steps it overlapped (``rank R run I overlapped [...]``);
``--env=MESHWRIGHT_TEST_NO_OVERLAP=1`` before a run's arguments makes it read every step back at once (the reference
run). Used by test_trainer_torchrun.py."""

import os
import sys
from datetime import timedelta

import torch.distributed as dist

import meshwright.train.trainer as trainer_mod
from cli_runs import run_all

if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    trainer_mod.fast_adamw_kwargs = lambda device: {"fused": True}
    may_overlap = trainer_mod.Trainer.may_overlap

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
        code = call()
        print(f"rank {rank} run {index} overlapped {overlapped}", flush=True)
        return code

    exit_worker(run_all(sys.argv[1:], timeout=timedelta(seconds=60), around=one_run))
