"""Distributed checkpoints with ``torch.distributed.checkpoint`` (DCP) that reshard across Plans.

State is keyed by the plain model's parameter names (DTensors where a layout shards them), so a
checkpoint written under dp2·tp2 loads under pp2, under pp2·dp2 or into one process: DCP reads
each rank's pieces from whatever pieces were written. Optimizer states go through
``get_optimizer_state_dict``/``set_optimizer_state_dict`` (keyed by the same names). Writes are
atomic: DCP writes into ``<path>.tmp`` and rank 0 renames it into place after every rank finished.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

META = "meshwright_meta.json"


def _dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _dist():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _dist() else 0


def _states(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict | None) -> dict[str, Any]:
    state: dict[str, Any] = {"model": model_state if model_state is not None else get_model_state_dict(model)}
    if optimizer is not None:
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def save_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    model_state: dict | None = None, meta: dict | None = None) -> Path:
    """Collective: every rank calls it. ``model`` names parameters as the plain model does
    (``DistributedRuntime.model``); ``model_state`` overrides its state dict (``runtime.model_state()``)."""
    return _save_state(path, _states(model, optimizer, model_state), meta)


def _save_state(path: str | Path, state: dict[str, Any], meta: dict | None) -> Path:
    """DCP-save ``state`` into ``<path>.tmp``, then rank 0 renames it into place (atomic)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if _rank() == 0 and tmp.exists():
        shutil.rmtree(tmp)
    _barrier()
    dcp.save(state, checkpoint_id=str(tmp))
    _barrier()
    if _rank() == 0:
        (tmp / META).write_text(json.dumps(meta or {}, indent=1))
        old = path.with_name(path.name + ".old")
        if path.exists():
            path.rename(old)
        tmp.rename(path)
        if old.exists():
            shutil.rmtree(old)
    _barrier()
    return path


def load_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None, *,
                    model_state: dict | None = None,
                    load_model_state: Callable[[dict], None] | None = None) -> dict:
    """Collective: read ``path`` into this layout's pieces (resharding as needed); returns the meta dict.

    ``model_state``/``load_model_state`` are the runtime's hooks (``runtime.model_state()``,
    ``runtime.load_model_state``) for layouts whose parameters are not plain module state (megatron).
    """
    path = Path(path)
    if not (path / ".metadata").exists():
        raise FileNotFoundError(f"checkpoint={str(path)!r} is invalid; valid: a directory written by save_checkpoint (no .metadata)")
    state = _states(model, optimizer, model_state)
    dcp.load(state, checkpoint_id=str(path))
    if load_model_state is not None:
        load_model_state(state["model"])
    else:
        set_model_state_dict(model, state["model"], options=StateDictOptions(strict=True))
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])
    meta_file = path / META
    return json.loads(meta_file.read_text()) if meta_file.exists() else {}


def save_runtime(path: str | Path, runtime: Any, optimizer: torch.optim.Optimizer | None, meta: dict | None = None) -> Path:
    """Save a runtime's model + optimizer (its ``checkpoint_state`` hook when it has one: DeepSpeed, megatron)."""
    if hasattr(runtime, "checkpoint_state"):
        return _save_state(path, runtime.checkpoint_state(optimizer), meta)
    return save_checkpoint(path, runtime.model, optimizer, model_state=runtime.model_state(), meta=meta)


def load_runtime(path: str | Path, runtime: Any, optimizer: torch.optim.Optimizer | None) -> dict:
    """Load into a runtime of any layout (resharding); returns the meta dict."""
    if hasattr(runtime, "checkpoint_state"):
        path = Path(path)
        if not (path / ".metadata").exists():
            raise FileNotFoundError(f"checkpoint={str(path)!r} is invalid; valid: a directory written by save_checkpoint (no .metadata)")
        state = runtime.checkpoint_state(optimizer)
        dcp.load(state, checkpoint_id=str(path))
        runtime.load_checkpoint_state(state, optimizer)
        meta_file = path / META
        return json.loads(meta_file.read_text()) if meta_file.exists() else {}
    return load_checkpoint(path, runtime.model, optimizer, model_state=runtime.model_state(),
                           load_model_state=runtime.load_model_state)
