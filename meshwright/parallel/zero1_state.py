"""ZeRO-1 (``ZeroRedundancyOptimizer``) optimizer states through DCP checkpoints, without gathering them on one rank.

``ZeroRedundancyOptimizer`` partitions whole parameters over the dp ranks: each parameter's states live whole on
the one rank that owns it (its inner ``optim``). Its own ``state_dict`` needs ``consolidate_state_dict`` first, which
gathers every state on one rank (the memory ZeRO-1 saves, spent again). Here each rank contributes the states of the
parameters it owns, keyed by their plain-model FQNs in the flat layout every runtime writes (train/optim_layout.py:
``state.<fqn>.<entry>``, ``param_groups.<fqn>.<setting>`` for every FQN of the stage's groups, the same on every rank
of a stage). DCP takes keys that differ between ranks: a tensor key written by one rank only is a whole-tensor chunk
of that rank's plan (``dedup_save_plans`` keeps it there, ``_validate_global_plan`` sees one chunk covering it), and a
load reads only the keys of the template it is given (``create_default_local_load_plan``). So the checkpoint is the
one a ZeRO-0 run writes: it loads under ZeRO-0/2/3, another dp size, another partition or pipeline split, and a
ZeRO-0/2/3 checkpoint loads here; on load each rank reads only the states of the parameters it owns under the new
partition, and each group's settings at its own parameters' keys.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from meshwright.train.optim_layout import PARAMS, STATE, flatten, group_settings, param_fqns

__all__ = ["init_states", "load_zero1_state_dict", "param_fqns", "zero1_state_dict"]


def _hyper(group: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in group.items() if k != PARAMS}


@torch.no_grad()
def init_states(optimizer: torch.optim.Optimizer) -> None:
    """Create the states of a fresh optimizer by a zero-lr step over zero gradients (what DCP's ``get_state_dict``
    does for a ZeRO-0 optimizer): a load needs tensors of the right shapes to read into. The gradients are the
    caller's to set aside (``DistributedRuntime._grads_set_aside``); any found are left as they were."""
    params = [p for g in optimizer.param_groups for p in g[PARAMS] if p.requires_grad]
    if optimizer.state or not params:
        return
    saved = [p.grad for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    lrs = [g.get("lr") for g in optimizer.param_groups]
    for g in optimizer.param_groups:
        if "lr" in g:
            g["lr"] = torch.tensor(0.0) if isinstance(g["lr"], torch.Tensor) else 0.0
    try:
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            if lr is not None:
                g["lr"] = lr
        for p, grad in zip(params, saved):
            p.grad = grad


def zero1_state_dict(zero: ZeroRedundancyOptimizer, fqns: dict[nn.Parameter, str]) -> dict[str, Any]:
    """This rank's share of ``zero``'s state in the flat layout: the states of the parameters it owns (the live
    tensors: DCP reads into them on load) and every group's settings (the wrapper's: an LR scheduler sets them there;
    the inner optimizer sees them at its next step) at each of the group's FQNs."""
    inner = zero.optim
    for wrap, mine in zip(zero.param_groups, inner.param_groups):  # the scheduler's lr, as ZeRO's step would copy it
        mine.update(_hyper(wrap))
    init_states(inner)
    state = {fqns[p]: dict(inner.state[p]) for g in inner.param_groups for p in g[PARAMS] if p in inner.state}
    groups = [({**_hyper(mine), **_hyper(wrap)}, [fqns[p] for p in wrap[PARAMS]])
              for wrap, mine in zip(zero.param_groups, inner.param_groups)]
    return flatten(state, groups)


def load_zero1_state_dict(zero: ZeroRedundancyOptimizer, fqns: dict[nn.Parameter, str], osd: dict[str, Any]) -> None:
    """Load a DCP-read flat optimizer state dict (``zero1_state_dict``'s layout, filled for this rank's parameters)
    into ``zero``: the inner optimizer gets its parameters' states, wrapper and inner each group's settings as saved at
    the group's first parameter (the rule of torch's ``_unflatten_optim_state_dict``)."""
    inner = zero.optim
    state: dict[int, Any] = {}
    groups = []
    index = 0
    for wrap, mine in zip(zero.param_groups, inner.param_groups):
        ids = []
        for p in mine[PARAMS]:
            keys = {k: f"{STATE}.{fqns[p]}.{k}" for k in inner.state.get(p, {})}  # init_states made them
            entries = {k: osd[key] for k, key in keys.items() if key in osd}
            if entries:
                state[index] = entries
            ids.append(index)
            index += 1
        settings = group_settings(osd, [fqns[p] for p in wrap[PARAMS]], list(_hyper(wrap)))
        wrap.update(settings)
        groups.append({**_hyper(mine), **settings, PARAMS: ids})
    inner.load_state_dict({"state": state, "param_groups": groups})
