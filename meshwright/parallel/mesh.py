"""Named DeviceMeshes built from a Plan and passed explicitly to every apply function.

Rank layout (row-major, tp innermost): ``rank = pp_index * per_stage + local`` and inside a stage
``local = dp_index * tp + tp_index``. Every distinct tp degree in the Plan gets its own
``("pp", "dp", "tp")`` mesh over the same ranks, which is how consecutive layers use different
tp/dp splits (Galvatron-style). The data loader shards the global batch into ``max_dp`` pieces:
``g = min(tp)`` consecutive ranks read the same shard, and a layer with a larger tp first gathers
the batch over its ``rep = tp/g`` distinct shards (the ``("pp", "dp", "rep", "g")`` mesh).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from meshwright.plan import Plan


@dataclass
class PlanMeshes:
    """All meshes and coordinates one rank needs; built once, then handed to the apply functions."""

    device_type: str
    rank: int
    world_size: int
    pp: int
    per_stage: int
    g: int  # smallest tp degree: ranks of one data shard
    max_dp: int  # number of data shards of a global batch
    stage_mesh: DeviceMesh  # ("pp", "stage")
    tp_meshes: dict[int, DeviceMesh] = field(default_factory=dict)  # tp -> ("pp", "dp", "tp")
    gather_meshes: dict[int, DeviceMesh] = field(default_factory=dict)  # tp (> g) -> ("pp", "dp", "rep", "g")
    hsdp_meshes: dict[tuple[int, int], DeviceMesh] = field(default_factory=dict)  # (tp, shard) -> ("pp", "replicate", "shard", "tp")

    @property
    def pp_rank(self) -> int:
        return self.rank // self.per_stage

    @property
    def local_rank_in_stage(self) -> int:
        return self.rank % self.per_stage

    @property
    def dp_rank(self) -> int:
        """Which data shard this rank reads (ranks of one tp-min group read the same shard)."""
        return self.local_rank_in_stage // self.g

    @property
    def pp_group(self) -> dist.ProcessGroup:
        return self.stage_mesh.get_group("pp")

    @property
    def stage_group(self) -> dist.ProcessGroup:
        return self.stage_mesh.get_group("stage")

    def tp_mesh(self, tp: int) -> DeviceMesh:
        return self.tp_meshes[tp]["tp"]

    def dp_mesh(self, tp: int) -> DeviceMesh:
        return self.tp_meshes[tp]["dp"]


def build_meshes(plan: Plan, world_size: int, rank: int, device_type: str = "cpu",
                 dp_shard: int | None = None) -> PlanMeshes:
    """Create the meshes of ``plan`` (collective: every rank must call it in the same order).

    HSDP: a ZeRO-2/3 layer with ``dp_shard`` set (or, without it, the runtime-wide ``dp_shard``) shards over
    groups of that many dp ranks and replicates across the ``dp/dp_shard`` groups, on a
    ``("pp", "replicate", "shard", "tp")`` mesh per (tp, shard).
    """
    pp = plan.pipeline.degree
    per_stage = world_size // pp
    tps = sorted({s.tp for s in plan.layer_strategies()})
    g = tps[0]
    stage_mesh = init_device_mesh(device_type, (pp, per_stage), mesh_dim_names=("pp", "stage"))
    m = PlanMeshes(device_type=device_type, rank=rank, world_size=world_size, pp=pp, per_stage=per_stage,
                   g=g, max_dp=per_stage // g, stage_mesh=stage_mesh)
    for t in tps:
        m.tp_meshes[t] = init_device_mesh(device_type, (pp, per_stage // t, t), mesh_dim_names=("pp", "dp", "tp"))
        if t > g:
            m.gather_meshes[t] = init_device_mesh(device_type, (pp, per_stage // t, t // g, g),
                                                  mesh_dim_names=("pp", "dp", "rep", "g"))
    for t, shard in sorted({(s.tp, hsdp_shard(s, dp_shard)) for s in plan.layer_strategies()} - {(t, None) for t in tps}):
        dp = per_stage // t
        m.hsdp_meshes[(t, shard)] = init_device_mesh(device_type, (pp, dp // shard, shard, t),
                                                     mesh_dim_names=("pp", "replicate", "shard", "tp"))
    return m


def hsdp_shard(s: Any, default: int | None = None) -> int | None:
    """The shard-group size of layer strategy ``s`` under HSDP, or None when it shards over all dp ranks
    (or is not ZeRO-2/3). ``default`` is the runtime-wide ``dp_shard`` for layers that set none."""
    shard = s.dp_shard if s.dp_shard is not None else default
    if s.zero < 2 or shard is None or not 1 <= shard < s.dp or s.dp % shard:
        return None
    return shard


def exit_worker(code: int = 0) -> None:
    """End a torchrun worker without running C++ static destructors.

    With torch 2.13 on CPU/gloo a finished worker sometimes aborts at interpreter exit ("terminate called
    without an active exception", SIGABRT) after ``destroy_process_group``: a communicator thread is
    destroyed while still joinable. The work is done and flushed by then, so skip the teardown.
    """
    import os
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
