"""Atomic, resumable checkpoints with torch.distributed.checkpoint (DCP).

Model and optimiser state go through DCP's ``get_state_dict``/``set_state_dict`` (keyed by the plain
model's parameter names), so the same code saves one process today and sharded FSDP/TP layouts
later, and a checkpoint reshards between them. Trainer state (step, data position, RNG) sits beside
it. A checkpoint is written into ``step_000123.tmp/`` and renamed to ``step_000123/`` only when
complete; the ``latest`` pointer file is then replaced atomically, and only the last K are kept.
Without an initialised process group DCP runs in one process (verified by tests/unit/test_checkpoint.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from meshwright.errors import ConfigError
from meshwright.runtime import Runtime

STEP_RE = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    np_state = np.random.get_state()
    state["numpy"] = [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _runtime_state(runtime: Runtime, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The DCP state of a runtime: its own ``checkpoint_state`` hook when it has one (DeepSpeed's
    optimizer is not a torch optimizer), else DCP's ``get_state_dict`` over ``runtime.model``."""
    if hasattr(runtime, "checkpoint_state"):
        return runtime.checkpoint_state(optimizer)
    model_sd, optim_sd = get_state_dict(runtime.model, optimizer)
    return {"model": model_sd, "optim": optim_sd}


def save_checkpoint(root: str | Path, step: int, runtime: Runtime, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 3) -> Path:
    """Write checkpoint ``step`` under ``root`` atomically; every rank calls this. Returns the final dir."""
    root = Path(root)
    final, tmp = step_dir(root, step), root / f"step_{step:06d}.tmp"
    if runtime.is_main:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous crash mid-write
        tmp.mkdir()
    runtime.barrier()
    state = _runtime_state(runtime, optimizer)
    with _quiet_dcp():
        dcp.save(state, checkpoint_id=str(tmp))
    torch.save(rng_state(), tmp / f"rng_rank{runtime.rank:05d}.pt")
    if runtime.is_main:
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    runtime.barrier()
    if runtime.is_main:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        pointer = root / f"{LATEST}.tmp"
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
        for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / "trainer_state.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / "trainer_state.json").is_file():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def load_checkpoint(path: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load model + optimiser (in place, via DCP) and this rank's RNG; return the trainer state."""
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise ConfigError(f"resume={str(path)!r} is not a complete checkpoint; valid: a step_NNNNNN directory with trainer_state.json")
    state = _runtime_state(runtime, optimizer)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    if hasattr(runtime, "load_checkpoint_state"):
        runtime.load_checkpoint_state(state, optimizer)
    else:
        set_state_dict(runtime.model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_file = path / f"rng_rank{runtime.rank:05d}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads(state_file.read_text())
