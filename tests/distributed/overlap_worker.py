"""`meshwright train` on every torchrun rank with fused AdamW (what CUDA gets; it runs on CPU too), so ranks whose
parameters are plain tensors overlap the loss read-back with the next step; a short gloo timeout turns a
collective-order mismatch between ranks into a failure instead of a hang. Used by test_trainer_torchrun.py."""

import sys
from datetime import timedelta

import torch.distributed as dist

import meshwright.train.trainer as trainer_mod
from meshwright.cli import main

if __name__ == "__main__":
    from meshwright.parallel.mesh import exit_worker

    dist.init_process_group("gloo", timeout=timedelta(seconds=60))  # init_distributed keeps this group
    trainer_mod.fast_adamw_kwargs = lambda device: {"fused": True}
    exit_worker(main(["train", *sys.argv[1:]]))
