"""Atomic, resharding checkpoints with torch.distributed.checkpoint (DCP): the one checkpoint module.

Two layers. ``save_runtime``/``load_runtime`` write and read one checkpoint directory for any runtime:
model and optimiser state keyed by the plain model's parameter names (DTensors where a layout shards
them), so a checkpoint written under dp2·tp2 loads under pp2, under pp2·dp2 or into one process, and
DCP reads each rank's pieces from whatever pieces were written. The directory is written into
``<path>.tmp`` and renamed into place by the main rank after every rank finished, so a crash never
leaves a half-written checkpoint under the final name. ``trainer_state.json`` (the caller's meta:
step, data position, ...) marks a checkpoint directory; per-rank RNG files sit beside it when asked for. ``save_checkpoint``/``list_checkpoints``/``latest_checkpoint`` add the
trainer's step management on top: ``step_000123/`` directories, a ``latest`` pointer file replaced
atomically, keep-last-K. Without an initialised process group DCP runs in one process (verified by
tests/unit/test_checkpoint.py).
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

from meshwright.errors import invalid
from meshwright.train.runtime import Runtime

STEP_RE = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"
STATE_FILE = "trainer_state.json"  # the caller's meta; a step_* directory without it is not a checkpoint


def step_dir(root: Path, step: int) -> Path:
    return root / f"step_{step:06d}"


def _rng_file(path: Path, rank: int) -> Path:
    return path / f"rng_rank{rank:05d}.pt"


@contextlib.contextmanager
def _quiet_dcp() -> Iterator[None]:
    """DCP warns that it 'assumes a single process' when no process group exists; that is intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch.distributed is disabled, unavailable or uninitialized.*")
        yield


def rng_state() -> dict[str, Any]:
    """This process's torch/python/numpy (and CUDA) RNG as tensors and plain types, loadable with ``weights_only=True``."""
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


@contextlib.contextmanager
def _atomic_dir(path: Path, runtime: Runtime) -> Iterator[Path]:
    """Collective: yield an empty ``<path>.tmp`` for every rank to write into; once all ranks are done
    the main rank swaps it in for ``path``, so ``path`` only ever names a complete checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    if runtime.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous crash mid-write
        tmp.mkdir(parents=True)
    runtime.barrier()
    yield tmp
    runtime.barrier()
    if runtime.is_main:
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()


def save_runtime(path: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer | None,
                 meta: dict[str, Any] | None = None, *, rng: bool = False) -> Path:
    """Collective: every rank calls it. Write the runtime's model + optimizer (DCP), ``meta`` as
    trainer_state.json and, with ``rng``, each rank's RNG into ``path`` atomically. Returns ``path``."""
    path = Path(path)
    with _atomic_dir(path, runtime) as tmp:
        with _quiet_dcp():
            dcp.save(runtime.checkpoint_state(optimizer), checkpoint_id=str(tmp))
        if rng:
            torch.save(rng_state(), _rng_file(tmp, runtime.rank))
        if runtime.is_main:
            (tmp / STATE_FILE).write_text(json.dumps(meta or {}, indent=1))
    return path


def load_runtime(path: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Collective: read ``path`` into this layout's pieces (resharding as needed) and this rank's RNG
    when the checkpoint has it; returns the meta (trainer state) dict."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not (state_file.is_file() and (path / ".metadata").is_file()):
        raise invalid("resume", str(path), f"a complete checkpoint directory (with .metadata and {STATE_FILE})")
    state = runtime.checkpoint_state(optimizer)
    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path))
    runtime.load_checkpoint_state(state, optimizer)
    rng_file = _rng_file(path, runtime.rank)
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads(state_file.read_text())


def save_checkpoint(root: str | Path, step: int, runtime: Runtime, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 3) -> Path:
    """Collective: write checkpoint ``step`` under ``root`` (with RNG), point ``latest`` at it and keep
    the last ``keep``. Returns the checkpoint's directory."""
    root = Path(root)
    final = save_runtime(step_dir(root, step), runtime, optimizer, {**trainer_state, "step": step}, rng=True)
    if runtime.is_main:
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
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, else the newest complete one, else None."""
    root = Path(root)
    pointer = root / LATEST
    if pointer.is_file():
        target = root / pointer.read_text().strip()
        if (target / STATE_FILE).is_file():
            return target
    found = list_checkpoints(root)
    return found[-1] if found else None
