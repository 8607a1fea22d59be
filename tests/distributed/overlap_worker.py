"""`meshwright train` on every torchrun rank with fused AdamW (what CUDA gets; it runs on CPU too), so ranks whose
parameters are plain tensors may overlap the loss read-back with the next step; a short gloo timeout turns a
collective-order mismatch between ranks into a failure instead of a hang. Each rank prints the steps it
overlapped; ``MESHWRIGHT_TEST_NO_OVERLAP=1`` reads every step back at once (the reference run).
Used by test_trainer_torchrun.py."""

import os
import sys
from datetime import timedelta

import torch.distributed as dist

import meshwright.train.trainer as trainer_mod
from meshwright.cli import main

if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # init_distributed keeps this group
    trainer_mod.fast_adamw_kwargs = lambda device: {"fused": True}
    overlapped: list[int] = []
    may_overlap = trainer_mod.Trainer.may_overlap

    def spy(self, step: int) -> bool:
        if os.environ.get("MESHWRIGHT_TEST_NO_OVERLAP") == "1":
            return False
        ok = may_overlap(self, step)
        if ok:
            overlapped.append(step)
        return ok

    trainer_mod.Trainer.may_overlap = spy
    rank = dist.get_rank()
    code = main(["train", *sys.argv[1:]])
    print(f"rank {rank} overlapped {overlapped}", flush=True)
    exit_worker(code)
