"""ZeRO-1 (``ZeroRedundancyOptimizer``) optimizer states through DCP checkpoints, without gathering them on one rank.

``ZeroRedundancyOptimizer`` partitions whole parameters over the dp ranks: each parameter's states live whole on
the one rank that owns it (its inner ``optim``). Its own ``state_dict`` needs ``consolidate_state_dict`` first, which
gathers every state on one rank (the memory ZeRO-1 saves, spent again). Here each rank contributes the states of the
parameters it owns, keyed by their plain-model FQNs as ``torch.distributed.checkpoint.state_dict.get_state_dict``
keys a ZeRO-0 optimizer (``{"state": {fqn: {...}}, "param_groups": [{..., "params": [fqn, ...]}]}``); the
param_groups list every FQN of the group (the same on every rank of a stage; under pipelining each stage lists its
own, and DCP keeps one stage's lists, as for ZeRO-0). DCP takes keys that differ between ranks: a
tensor key written by one rank only is a whole-tensor chunk of that rank's plan (``dedup_save_plans`` keeps it there,
``_validate_global_plan`` sees one chunk covering it), and a load reads only the keys of the template it is given
(``create_default_local_load_plan``). So the checkpoint is the one a ZeRO-0 run writes: it loads under ZeRO-0/2/3,
another dp size or another partition, and a ZeRO-0/2/3 checkpoint loads here; on load each rank reads only the
states of the parameters it owns under the new partition.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from meshwright.errors import ConfigError

PARAMS = "params"


def param_fqns(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter's FQN as DCP's ``get_state_dict`` names it (wrappers' prefixes such as ``_orig_mod.`` or
    ``_checkpoint_wrapped_module.`` dropped; a tied parameter under its first name, as ``named_parameters`` gives)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    out: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        fqns = _get_fqns(model, name)
        out[p] = next(iter(fqns))
    return out


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
    """This rank's share of ``zero``'s state as a ZeRO-0 optimizer's DCP state dict: the states of the parameters
    it owns (the live tensors: DCP reads into them on load) and every group's hyper-parameters (the wrapper's: an LR
    scheduler sets them there; the inner optimizer sees them at its next step) with all of the group's FQNs."""
    inner = zero.optim
    for wrap, mine in zip(zero.param_groups, inner.param_groups):  # the scheduler's lr, as ZeRO's step would copy it
        mine.update(_hyper(wrap))
    init_states(inner)
    state = {fqns[p]: dict(inner.state[p]) for g in inner.param_groups for p in g[PARAMS] if p in inner.state}
    groups = [{**_hyper(mine), **_hyper(wrap), PARAMS: [fqns[p] for p in wrap[PARAMS]]}
              for wrap, mine in zip(zero.param_groups, inner.param_groups)]
    return {"state": state, "param_groups": groups}


def load_zero1_state_dict(zero: ZeroRedundancyOptimizer, fqns: dict[nn.Parameter, str], osd: dict[str, Any]) -> None:
    """Load a DCP-read optimizer state dict (``zero1_state_dict``'s layout, filled for this rank's parameters) into
    ``zero``: the inner optimizer gets its parameters' states, wrapper and inner get the saved hyper-parameters.
    Groups are matched by position (the runtime's: matrices, then vectors), not by their ``params`` lists: under
    pipelining each stage writes its own list under the same key and DCP keeps one stage's (as for ZeRO-0's
    ``get_state_dict``), so a list need not name this rank's parameters."""
    inner = zero.optim
    saved = osd["param_groups"]
    if len(saved) != len(zero.param_groups):
        raise ConfigError(f"optimizer param_groups: the checkpoint has {len(saved)} group(s), this run "
                          f"{len(zero.param_groups)}; valid: a checkpoint of the same optimizer setup")
    state: dict[int, Any] = {}
    groups = []
    index = 0
    for group, mine in zip(saved, inner.param_groups):
        ids = []
        for p in mine[PARAMS]:
            fqn = fqns[p]
            if fqn in osd["state"]:
                state[index] = osd["state"][fqn]
            ids.append(index)
            index += 1
        groups.append({**_hyper(group), PARAMS: ids})
    inner.load_state_dict({"state": state, "param_groups": groups})
    for group, wrap in zip(saved, zero.param_groups):
        wrap.update(_hyper(group))

