"""ZeRO-2/3 (FSDP2) of expert-parallel experts: each rank's experts sharded over its expert-data-parallel group.

Layout (torchtitan's ``efsdp`` / Megatron's expert distributed optimizer): under ep > 1 the ``ep`` ranks of an ep group
hold different experts, and the ``edp = dp/ep`` ranks holding the same experts (``expert_parallel.EPGroups.edp``) are
the only ones that may shard them. So an MoE block is wrapped twice: its ``ExpertParallelExperts`` first, with
``fully_shard`` over the 1-D ``edp`` mesh (the runtime's ``("pp", "edp", "ep", "tp")`` mesh, passed explicitly), then
the block itself over the whole dp group, which then manages only the non-expert parameters (attention, norms, router).

Sharded dim. Expert weights are sharded on their ``d_model`` dim (``EXPERT_FSDP_DIMS``: w1/w3 (E, hidden, d_model) on
2, w2 (E, d_model, hidden) on 1), not on the expert dim 0: dim 0 is already cut over ep and, under expert tp, the
hidden dim over tp; sharding a third, distinct dim keeps the rank's piece a plain box of the full tensor, so
checkpoints see one DTensor over ``(edp, ep[, tp])`` with one ``Shard`` per mesh dim (no nested shards of one dim, whose
order DTensor reads left to right), and a layer with fewer local experts than edp ranks still shards evenly.

Gradients. Backward through the token all-to-all leaves on every rank the sum over its ep group of d(loss_r)/dw; the
reduce-scatter sums that over edp, so the experts' gradient is the sum over all dp ranks, divided by ``dp`` (not by
FSDP's default, the edp size): ``set_gradient_divide_factor(dp)``, as ZeRO-0's ``reduce_expert_grads`` divides. Sum-only
collectives off CUDA (gloo has no PREMUL_SUM): ``set_force_sum_reduction_for_comms``, then FSDP divides itself.

Boxes. The ep cut's box of the plain shard (``meta_init.ep_boxes``, the runtime's ``shard_boxes``, recorded before
this) stays the experts' one record: FSDP's DTensor has that shard as its whole, and init, ``init_from`` and the
checkpoint view place its piece inside the box by its placements (``meta_init.check_piece_box`` at build).

Checkpoints. FSDP's DTensor covers this rank's experts only (global shape n_experts/ep); ``to_checkpoint`` shows the
same local piece as a DTensor of the full (n_experts, ...) tensor (the box's global shape) over ``(edp, ep[, tp])``, and
``from_checkpoint`` cuts a DTensor of any layout (or a full tensor) back to FSDP's; so DCP reshards between this, ZeRO-0
ep, other ep degrees and one process. Model state by module hooks, optimizer states (AdamW's exp_avg...) by optimizer
hooks."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, Shard

from meshwright.errors import invalid
from meshwright.parallel.expert_parallel import ExpertParallelExperts
from meshwright.parallel.expert_tp import EXPERT_TP_DIMS

# the d_model dim of each stacked expert weight: never cut by ep (dim 0) or expert tp (hidden)
EXPERT_FSDP_DIMS = {"w1": 2, "w3": 2, "w2": 1}


def apply_expert_fsdp(experts: ExpertParallelExperts, edp_mesh: DeviceMesh, zero: int, dp_size: int,
                      mp_policy: Any = None) -> list[nn.Parameter]:
    """ZeRO-``zero`` (2 or 3) sharding of one layer's local experts over the 1-D ``edp_mesh``; gradients divided by
    ``dp_size`` (the whole dp group's mean loss). Returns the sharded (DTensor) weights, marked as expert shards."""
    if not isinstance(experts, ExpertParallelExperts):
        raise invalid("experts", type(experts).__name__, "ExpertParallelExperts (apply_ep before apply_expert_fsdp)")
    if zero not in (2, 3):
        raise invalid("zero", zero, "2 or 3 for FSDP of expert shards")
    if experts.gate_up_proj is not None or experts.down_proj is not None:
        raise invalid("lora.targets", "experts.*", "attention targets with zero>=2 and ep>1 (expert adapters under "
                      "FSDP are not supported), or zero 0")
    dims = {id(getattr(experts, w)): d for w, d in EXPERT_FSDP_DIMS.items()}
    extra = {"mp_policy": mp_policy} if mp_policy is not None else {}
    fully_shard(experts, mesh=edp_mesh, reshard_after_forward=(zero == 3),
                shard_placement_fn=lambda p: Shard(dims.get(id(p), 0)), **extra)
    experts.set_gradient_divide_factor(float(dp_size))
    if edp_mesh.device_type != "cuda" and edp_mesh.size() > 1:  # gloo: no PREMUL_SUM; sum, then FSDP divides.
        # Not on one rank (edp = 1: dp = ep): there FSDP's copy already divides by the factor, and forced sums
        # divide a second time (torch 2.13's foreach_reduce; measured: expert gradients half the one-process ones)
        experts.set_force_sum_reduction_for_comms(True)
    params = [getattr(experts, w) for w in EXPERT_FSDP_DIMS]
    for p in params:  # fully_shard made new Parameters: the expert mark again
        p._meshwright_expert = True  # type: ignore[attr-defined]
    return params


def checkpoint_layout(experts: ExpertParallelExperts, w: str, mesh: DeviceMesh, tp: int) -> tuple[DeviceMesh, list[Shard]]:
    """The (mesh, placements) checkpoints show expert weight ``w`` on: ``mesh`` is the runtime's ``("pp", "edp", "ep",
    "tp")`` mesh; the d_model dim over edp, the experts over ep, under expert tp the hidden dim over tp."""
    if tp > 1:
        return mesh["edp", "ep", "tp"], [Shard(EXPERT_FSDP_DIMS[w]), Shard(0), Shard(EXPERT_TP_DIMS[w])]
    return mesh["edp", "ep"], [Shard(EXPERT_FSDP_DIMS[w]), Shard(0)]


def _contiguous_stride(shape: tuple[int, ...]) -> tuple[int, ...]:
    stride, acc = [], 1
    for n in reversed(shape):
        stride.append(acc)
        acc *= n
    return tuple(reversed(stride))


def to_checkpoint(v: torch.Tensor, shape: tuple[int, ...], mesh: DeviceMesh, placements: list[Shard]) -> torch.Tensor:
    """FSDP's DTensor ``v`` (this rank's experts, d_model-sharded over edp) as a DTensor of the full tensor; other
    values (not this parameter's layout) are returned unchanged."""
    if not isinstance(v, DTensor):
        return v
    return DTensor.from_local(v.to_local(), mesh, placements, run_check=False, shape=torch.Size(shape),
                              stride=_contiguous_stride(shape))


def from_checkpoint(v: torch.Tensor, like: DTensor, mesh: DeviceMesh, placements: list[Shard]) -> torch.Tensor:
    """``v`` (a DTensor of any layout of the full tensor, a full tensor, or already FSDP's layout) as FSDP's DTensor
    ``like`` holds it: this rank's box of the full tensor, wrapped on ``like``'s edp mesh and placements."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    if isinstance(v, DTensor) and v.device_mesh == like.device_mesh and v.placements == like.placements \
            and v.shape == like.shape:
        return v
    local_shape = like.to_local().shape
    if isinstance(v, DTensor):
        if v.placements == tuple(placements) and v.device_mesh == mesh and v.to_local().shape == local_shape:
            local = v.to_local()
        else:
            v = v.full_tensor()
            local = None
    else:
        local = None
    if local is None:
        shape, offset = compute_local_shape_and_global_offset(v.shape, mesh, placements)
        local = v[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
    return DTensor.from_local(local.to(like.dtype).contiguous(), like.device_mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


Layouts = dict[str, tuple[tuple[int, ...], DeviceMesh, list[Shard]]]  # name -> (full shape, checkpoint mesh, placements)


def install_expert_fsdp_model_hooks(module: nn.Module, layouts: Layouts) -> None:
    """``module.state_dict()`` shows the FSDP expert weights named in ``layouts`` as DTensors of the full tensors;
    their loads accept any layout (``from_checkpoint``)."""
    def post(_: nn.Module, state: dict, prefix: str, __: dict) -> None:
        for name, (shape, mesh, pl) in layouts.items():
            if prefix + name in state:
                state[prefix + name] = to_checkpoint(state[prefix + name], shape, mesh, pl)

    def pre(mod: nn.Module, state: dict, prefix: str, *_: object) -> None:
        live = dict(mod.named_parameters())
        for name, (_, mesh, pl) in layouts.items():
            if prefix + name in state:
                state[prefix + name] = from_checkpoint(state[prefix + name], live[name], mesh, pl)

    module.register_state_dict_post_hook(post)
    module.register_load_state_dict_pre_hook(pre)


def install_expert_fsdp_optimizer_hooks(module: nn.Module, optimizer: torch.optim.Optimizer, layouts: Layouts) -> None:
    """``optimizer.state_dict()`` shows the states of ``module``'s FSDP expert weights named in ``layouts`` laid out
    as their parameters (AdamW's moments) as DTensors of the full tensors; their loads accept any layout."""
    params = dict(module.named_parameters())
    by_param = {params[n]: v for n, v in layouts.items() if n in params}

    def pairs(state_dict: dict) -> list[tuple[Any, nn.Parameter]]:
        return [(k, p) for saved, live in zip(state_dict["param_groups"], optimizer.param_groups)
                for k, p in zip(saved["params"], live["params"]) if p in by_param]

    def opt_post(_: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict["state"] = dict(state_dict["state"])  # copies: the live states stay FSDP's DTensors
        for k, p in pairs(state_dict):
            if k in state_dict["state"]:
                shape, mesh, pl = by_param[p]
                state_dict["state"][k] = {key: to_checkpoint(v, shape, mesh, pl) if _like(v, p) else v
                                          for key, v in state_dict["state"][k].items()}
        return state_dict

    def opt_pre(_: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict["state"] = dict(state_dict["state"])
        for k, p in pairs(state_dict):
            if k in state_dict["state"]:
                _, mesh, pl = by_param[p]
                state_dict["state"][k] = {key: from_checkpoint(v, p, mesh, pl)
                                          if torch.is_tensor(v) and v.dim() == p.dim() else v
                                          for key, v in state_dict["state"][k].items()}
        return state_dict

    optimizer.register_state_dict_post_hook(opt_post)
    optimizer.register_load_state_dict_pre_hook(opt_pre)


def _like(v: Any, p: DTensor) -> bool:
    """An optimizer state laid out as its FSDP parameter (AdamW's moments; not its step)."""
    return isinstance(v, DTensor) and v.shape == p.shape and v.placements == p.placements


__all__ = ["EXPERT_FSDP_DIMS", "apply_expert_fsdp", "checkpoint_layout", "from_checkpoint",
           "install_expert_fsdp_model_hooks", "install_expert_fsdp_optimizer_hooks", "to_checkpoint"]
