"""Layer-wise layouts (Galvatron-style): redistribute activations between layers of different tp.

Inside a pipeline stage the activation between blocks is a plain tensor holding this rank's data
shard (the loader splits the batch into ``max_dp`` shards, ``g = min tp`` ranks per shard). A
block with tp > g needs the whole batch of its tp group: a forward pre-hook all-gathers the batch
over the ``rep`` dimension (DTensor Shard(0) -> Replicate) and a forward hook hands each rank its
shard back (Replicate -> Shard(0)). DTensor's redistribute supplies the matching backward
(slice / all-gather), so gradients stay exact without hand-written autograd functions.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard


def _gather_batch(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return DTensor.from_local(x, mesh, [Shard(0)], run_check=False).redistribute(mesh, [Replicate()]).to_local()


def _split_batch(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).redistribute(mesh, [Shard(0)]).to_local()


def apply_batch_redistribution(block: nn.Module, rep_mesh: DeviceMesh) -> nn.Module:
    """Make ``block`` (tp larger than the data granularity) run on its tp group's whole batch."""

    def pre(_: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        return (_gather_batch(args[0], rep_mesh), *args[1:])

    def post(_: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
        return _split_batch(out, rep_mesh)

    block.register_forward_pre_hook(pre, prepend=True)  # before any tensor-parallel input hook
    block.register_forward_hook(post)  # call after apply_tp: runs after its output hook
    return block
