"""How optimizer state is keyed in a checkpoint: one key per parameter and entry, for every layout and ZeRO level.

torch's ``get_state_dict`` nests the optimizer state as ``{"state": {fqn: {...}}, "param_groups": [{..., "params":
[fqn, ...]}]}``; DCP stores each group's ``params`` list under ``optim.param_groups.<i>.params``. Under pipelining
every stage writes its own list under that one key and DCP keeps one stage's, so a stage whose list was dropped
resumed with groups that named none of its parameters: the hyper-parameters were lost (AdamW: ``KeyError: 'betas'``
at the first step after a pp2 ZeRO-0 resume). torch's own answer is ``flatten_optimizer_state_dict`` (what torchtitan
saves): ``state.<fqn>.<entry>`` and ``param_groups.<fqn>.<setting>``, keys that no two stages share. Every meshwright
runtime writes that layout (ZeRO-0/2/3 through ``get_state_dict``, ZeRO-1 through ``parallel/zero1_state.py``, one
process through ``get_optimizer_state_dict``), so any checkpoint loads under any layout.

Checkpoints written before it (nested groups, ``optim.param_groups.<i>.<setting>``) still load: ``legacy_groups``
sees the old keys in ``.metadata``, ``legacy_template`` reads their group settings, and ``legacy_to_flat`` gives
them to this run's groups by position (the runtimes' order: matrices, then vectors), whichever stage's list was kept.
The state tensors have the same keys in both layouts (``optim.state.<fqn>.<entry>``).
"""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions

from meshwright.errors import ConfigError

STATE, GROUPS, PARAMS = "state", "param_groups", "params"
_LEGACY = re.compile(r"^optim\.param_groups\.(\d+)\.([^.]+)$")


def flat_options(**kw: Any) -> StateDictOptions:
    """``StateDictOptions`` for the flat optimizer layout (a new object each call: torch keeps per-call info on it)."""
    return StateDictOptions(flatten_optimizer_state_dict=True, **kw)


def param_fqns(model: nn.Module) -> dict[nn.Parameter, str]:
    """Each parameter's FQN as DCP's ``get_state_dict`` names it (wrappers' prefixes such as ``_orig_mod.`` or
    ``_checkpoint_wrapped_module.`` dropped; a tied parameter under its first name, as ``named_parameters`` gives)."""
    from torch.distributed.checkpoint.state_dict import _get_fqns

    out: dict[nn.Parameter, str] = {}
    for name, p in model.named_parameters():
        out[p] = next(iter(_get_fqns(model, name)))
    return out


def group_fqns(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """The FQNs of each of ``optimizer``'s groups, in order (a ZeRO-1 wrapper's groups hold the whole stage's)."""
    fqns = param_fqns(model)
    return [[fqns[p] for p in g[PARAMS]] for g in optimizer.param_groups]


def flatten(state: dict[str, dict[str, Any]], groups: list[tuple[dict[str, Any], list[str]]]) -> dict[str, Any]:
    """The flat layout of ``state`` ({fqn: {entry: value}}) and ``groups`` ([(settings, fqns)]): the keys torch's
    ``flatten_optimizer_state_dict`` writes (for optimizers whose entries are not nested, as AdamW's and COAT's)."""
    out: dict[str, Any] = {f"{STATE}.{fqn}.{k}": v for fqn, entries in state.items() for k, v in entries.items()}
    for settings, fqns in groups:
        for fqn in fqns:
            out.update({f"{GROUPS}.{fqn}.{k}": v for k, v in settings.items() if k != PARAMS})
    return out


def group_settings(flat: dict[str, Any], fqns: list[str], keys: list[str]) -> dict[str, Any]:
    """A group's settings (``keys``) read off the flat layout at its first parameter (torch's ``_unflatten``'s rule)."""
    return {k: flat[f"{GROUPS}.{fqns[0]}.{k}"] for k in keys if f"{GROUPS}.{fqns[0]}.{k}" in flat}


def legacy_groups(metadata: Metadata) -> dict[int, list[str]]:
    """{group index: setting names} of a checkpoint in the nested layout (earlier meshwright); {} for the flat one."""
    found: dict[int, list[str]] = {}
    for key in metadata.state_dict_metadata:
        m = _LEGACY.match(key)
        if m and m.group(2) != PARAMS:
            found.setdefault(int(m.group(1)), []).append(m.group(2))
    return found


def legacy_template(optim: dict[str, Any], metadata: Metadata) -> dict[str, Any]:
    """``optim`` (a flat template) with its group settings replaced by the nested ones the checkpoint holds, for DCP to
    read into; the state tensors keep their keys (the same in both layouts)."""
    saved = metadata.state_dict_metadata
    groups: list[dict[str, Any]] = []
    for i, names in sorted(legacy_groups(metadata).items()):
        while len(groups) <= i:
            groups.append({})
        for k in names:
            md = saved[f"optim.{GROUPS}.{i}.{k}"]
            groups[i][k] = (torch.empty(md.size, dtype=md.properties.dtype) if isinstance(md, TensorStorageMetadata)
                            else None)
    return {**{k: v for k, v in optim.items() if not k.startswith(f"{GROUPS}.")}, GROUPS: groups}


def legacy_to_flat(read: dict[str, Any], template: dict[str, Any], fqns: list[list[str]], where: str) -> dict[str, Any]:
    """The flat layout of ``read`` (a ``legacy_template`` DCP filled): saved group ``i``'s settings for every parameter
    of this run's group ``i``; settings the checkpoint lacks (a newer torch's) keep this run's ``template`` values."""
    saved = read[GROUPS]
    if len(saved) != len(fqns):
        raise ConfigError(f"resume={where!r} does not fit this run: the checkpoint's optimizer has {len(saved)} "
                          f"param group(s), this run's {len(fqns)}; valid: a checkpoint of the same optimizer setup")
    out = {k: v for k, v in read.items() if k != GROUPS}
    out.update({k: v for k, v in template.items() if k.startswith(f"{GROUPS}.")})
    for group, names in zip(saved, fqns):
        for fqn in names:
            out.update({f"{GROUPS}.{fqn}.{k}": v for k, v in group.items() if f"{GROUPS}.{fqn}.{k}" in template})
    return out
