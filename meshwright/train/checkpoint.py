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

Nothing read back is trusted: ``checksums.json`` (SHA-256 per file, written before the rename) is verified
before DCP reads a byte, ``.metadata`` and byte items go through allow-listed unpicklers
(``checkpoint_io``), a checkpoint that does not fit this model/optimizer is named in one line, and
``load_latest`` falls back to the previous complete checkpoint when the newest one is damaged.

A LoRA run's checkpoints are adapter-only by default (``adapters``, an ``AdapterScope``: train/lora_base.py): the
model part holds the trained tensors, trainer_state.json the base they were trained on; the load checks that base
against the runtime's and reads the trained tensors over it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.tensor import DTensor, distribute_tensor

from meshwright.errors import ConfigError, first_line, invalid
from meshwright.models.positions import TABLE, check_growth, grow_table
from meshwright.train.checkpoint_io import (
    MANIFEST, CheckpointCorrupt, SafeFileSystemReader, SafeLoadPlanner, read_metadata_file, verify_manifest,
    verify_sizes, write_manifest,
)
from meshwright.train.faults import fault_point
from meshwright.train.lora_base import BASE_KEY, AdapterScope, check_base
from meshwright.train.optim_layout import GROUPS, group_fqns, legacy_groups, legacy_template, legacy_to_flat
from meshwright.train.runtime import Runtime

STEP_RE = re.compile(r"^step_(\d{6,})$")
LATEST = "latest"
STATE_FILE = "trainer_state.json"  # the caller's meta; a step_* directory without it is not a checkpoint
# optimizer param_group keys that pick kernels for this process's layout and device, not training hyper-parameters:
# loading restores the writer's param_groups, so a dp2 checkpoint (foreach=True) resumed under tp2, whose runtime
# turns foreach off for its mix of DTensor and plain parameters, failed its first step ("got mixed torch.Tensor and
# DTensor"); they are kept as the runtime set them
KERNEL_KEYS = ("foreach", "fused", "capturable", "differentiable")


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


def prepare_tmp(path: Path, runtime: Runtime) -> Path:
    """Collective: an empty ``<path>.tmp`` (a previous crash's leftover removed) that every rank may write into."""
    tmp = path.with_name(path.name + ".tmp")
    if runtime.is_main:
        if tmp.exists():
            shutil.rmtree(tmp)  # a previous crash mid-write
        tmp.mkdir(parents=True)
    runtime.barrier()
    return tmp


class CheckpointPeerLost(ConfigError):
    """A checkpoint write given up because a peer rank died or a collective timed out (``peer_lost``)."""


def peer_lost(exc: BaseException) -> bool:
    """Whether a write failed because another rank is gone or a collective timed out (gloo's 'Connection reset by
    peer', 'Connection closed by peer', 'Timed out waiting ... for send operation'), looking through DCP's
    CheckpointException and causes."""
    seen: list[BaseException] = [exc]
    while seen:
        e = seen.pop()
        if isinstance(e, getattr(torch.distributed, "DistError", ())) or any(
                k in str(e) for k in ("by peer", "Timed out waiting", "gloo/transport", "Socket Timeout")):
            return True
        if isinstance(e, CheckpointException):
            seen.extend(err for err, _trace in e.failures.values() if isinstance(err, BaseException))
        seen.extend(x for x in (e.__cause__, e.__context__) if x is not None and x is not e)
        if len(seen) > 32:  # a cycle of causes
            break
    return False


def write_failed(tmp: Path, path: Path, exc: BaseException, is_main: bool) -> BaseException:
    """The error to raise for a write into ``tmp`` that failed with ``exc``; the partial ``tmp`` is removed (main rank).
    A peer lost in any of the write's collectives (the tmp barrier, DCP's planning, the background write) is said as
    such, with the checkpoint to resume from, not as an unwritable directory."""
    full = _disk_full(tmp.parent)  # before the partial files are removed and free space returns
    if is_main:
        shutil.rmtree(tmp, ignore_errors=True)
    if _interrupted(exc):  # Ctrl-C inside DCP: an interruption (exit 130), not a failed write (exit 2)
        return KeyboardInterrupt()
    if peer_lost(exc):
        return _peer_lost_error(tmp, path, exc)
    return _save_error(path, exc, full)


def _peer_lost_reading(path: Path, exc: BaseException) -> CheckpointPeerLost:
    """A read given up for a lost peer: the checkpoint is not blamed (a user told "damaged" might delete a good one)."""
    first = first_line(exc, 300)
    return CheckpointPeerLost(f"checkpoint {path} was not read: a peer rank was lost or a collective timed out while "
                              f"the ranks read it ({type(exc).__name__}: {first}); the checkpoint is not known to be "
                              f"damaged; valid: find why that rank stopped (its log), then resume from it again")


def _peer_lost_error(tmp: Path, path: Path, exc: BaseException) -> CheckpointPeerLost:
    """What happened to a write given up for a lost peer, and what to do."""
    first = first_line(exc, 300)
    before = latest_checkpoint(path.parent)
    resume = (f"resume from the previous checkpoint {before} (`meshwright train ... --resume` takes it)"
              if before is not None else "no earlier checkpoint exists: the run restarts from step 0")
    return CheckpointPeerLost(f"checkpoint {path} was not completed: a peer rank was lost or a collective of the "
                              f"checkpoint writer timed out ({type(exc).__name__}: {first}); the partial {tmp.name} "
                              f"was removed; valid: find why that rank stopped (its log), then {resume}")


def publish(tmp: Path, path: Path) -> None:
    """Main rank, once every rank's files are in ``tmp``: checksums, then swap ``tmp`` in for ``path``."""
    try:
        fault_point("ckpt_write")
        write_manifest(tmp)  # after every rank's files exist; a directory without it is incomplete
    except (OSError, RuntimeError) as exc:
        raise write_failed(tmp, path, exc, True) from None
    old = path.with_name(path.name + ".old")
    try:
        if old.exists():
            shutil.rmtree(old)
        if path.exists():
            path.rename(old)
        os.replace(tmp, path)
    except OSError as exc:  # the swap itself (an unwritable ckpt/): the checkpoint's own line, no .tmp left
        if old.exists() and not path.exists():
            with contextlib.suppress(OSError):
                old.rename(path)  # the version it replaced, back in place
        shutil.rmtree(tmp, ignore_errors=True)
        raise _save_error(path, exc) from None
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def _atomic_dir(path: Path, runtime: Runtime) -> Iterator[Path]:
    """Collective: yield an empty ``<path>.tmp`` for every rank to write into; once all ranks are done
    the main rank swaps it in for ``path``, so ``path`` only ever names a complete checkpoint."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp = prepare_tmp(path, runtime)
        yield tmp
        runtime.barrier()
    except (OSError, RuntimeError, CheckpointException) as exc:
        raise write_failed(tmp, path, exc, runtime.is_main) from None
    if runtime.is_main:
        publish(tmp, path)
    runtime.barrier()


def _interrupted(exc: BaseException) -> bool:
    """DCP catches a KeyboardInterrupt raised while it writes and re-raises it wrapped in a CheckpointException."""
    return isinstance(exc, CheckpointException) and any(isinstance(err, KeyboardInterrupt)
                                                        for err, _trace in exc.failures.values())


def _disk_full(directory: Path, margin: int = 1 << 20) -> bool:
    """Less than ``margin`` bytes free where the checkpoint is written (torch.save reports a full disk as
    "unexpected pos", not ENOSPC)."""
    try:
        return shutil.disk_usage(directory).free < margin
    except OSError:
        return False


def _save_error(path: Path, exc: BaseException, full: bool = False) -> ConfigError:
    """One line for a failed checkpoint write; the partial ``.tmp`` is already gone."""
    nospace = full or getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)
    if nospace:
        return ConfigError(f"checkpoint {path}: no space left on device (the partial {path.name}.tmp was removed); "
                           f"valid: free space on that disk, a smaller keep_checkpoints, or another out_dir")
    first = str(exc).strip().splitlines()
    return ConfigError(f"checkpoint {path} could not be written: {type(exc).__name__}: "
                       f"{first[-1] if first else ''} (the partial {path.name}.tmp was removed); valid: a writable "
                       f"{path.parent} with room for the checkpoint, or another out_dir")


def saved_state(runtime: Runtime, optimizer: torch.optim.Optimizer | None, meta: dict[str, Any] | None,
                adapters: AdapterScope | None) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(state for DCP, meta) of a save: with an adapter-only LoRA scope the model part holds the trained tensors only
    and the meta names the base they were trained on (train/lora_base.py)."""
    state = runtime.checkpoint_state(optimizer)
    if adapters is None or not adapters.adapters_only:
        return state, meta
    return adapters.view(state), {**(meta or {}), BASE_KEY: adapters.base}


def save_runtime(path: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer | None,
                 meta: dict[str, Any] | None = None, *, rng: bool = False,
                 adapters: AdapterScope | None = None) -> Path:
    """Collective: every rank calls it. Write the runtime's model + optimizer (DCP), ``meta`` as
    trainer_state.json and, with ``rng``, each rank's RNG into ``path`` atomically. Returns ``path``.
    ``adapters``: a LoRA run's scope; with ``adapters_only`` the frozen base is left out (``saved_state``)."""
    path = Path(path)
    state, meta = saved_state(runtime, optimizer, meta, adapters)
    with _atomic_dir(path, runtime) as tmp:
        with _quiet_dcp():
            dcp.save(state, checkpoint_id=str(tmp))
        write_small_files(tmp, runtime, meta, rng=rng)
    return path


def write_small_files(tmp: Path, runtime: Runtime, meta: dict[str, Any] | None, *, rng: bool) -> None:
    """This rank's RNG file (with ``rng``) and, on the main rank, ``meta`` as trainer_state.json, into ``tmp``."""
    if rng:
        torch.save(rng_state(), _rng_file(tmp, runtime.rank))
    if runtime.is_main:
        (tmp / STATE_FILE).write_text(json.dumps(meta or {}, indent=1))


def require_complete(path: Path) -> None:
    """One line unless ``path`` is a complete checkpoint directory (checked before a run builds anything)."""
    if not ((path / STATE_FILE).is_file() and (path / ".metadata").is_file()):
        raise invalid("resume", str(path), f"a complete checkpoint directory (with .metadata and {STATE_FILE})")


def load_runtime(path: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer | None, *,
                 verify: bool = True, grow_positions: str | None = None,
                 adapters: AdapterScope | None = None) -> dict[str, Any]:
    """Collective: verify ``path`` (checksums, metadata allow-list, fit to this model/optimizer), read it into
    this layout's pieces (resharding as needed) and this rank's RNG; returns the meta (trainer state) dict.
    Every failure is one ``ConfigError`` line (``CheckpointCorrupt`` for damaged files); nothing is executed.
    ``grow_positions``: a learned position table (and its optimizer moments) saved with fewer rows than this model's
    is read at its saved size and grown by that rule (models/positions.py); without it, one line. An adapter-only
    LoRA checkpoint (``lora_base`` in its meta) needs ``adapters`` (the run's scope): the base this runtime was built
    from must be the checkpoint's (one line otherwise); only the trained tensors are read over it. A checkpoint of
    the nested optimizer layout (earlier meshwright versions) is read as such and its group settings given to this
    run's groups by position (train/optim_layout.py)."""
    path = Path(path)
    state_file = path / STATE_FILE
    require_complete(path)
    if verify:  # load_latest has just verified it
        error = _verify(path, runtime)
        if _agreed_bad(error, runtime):
            raise error or CheckpointCorrupt(f"checkpoint {path} is damaged (found by another rank)")
    if not (path / MANIFEST).is_file():
        if runtime.is_main:  # one line, as the other warnings of a resume (Python's warning added its code line)
            print(f"warning: checkpoint {path} has no {MANIFEST} (written before checksums, or removed); loading it "
                  f"unverified", file=sys.stderr, flush=True)
    meta = _read_json(state_file)
    state = runtime.checkpoint_state(optimizer)
    read = state  # what DCP fills: the whole state, or (adapter-only) a view of the trained tensors' entries
    if BASE_KEY in meta:
        if adapters is None:
            raise invalid("lora", None, f"the lora: section checkpoint {path} was trained with (it holds the LoRA "
                          f"adapters only, not the base model)")
        check_base(meta[BASE_KEY], adapters.base, path)
        read = adapters.view(state)
    metadata = read_metadata_file(path / ".metadata")
    flat_template = read.get("optim")
    kernels_kept = _kernel_entries(flat_template)
    legacy = optimizer is not None and isinstance(flat_template, dict) and bool(legacy_groups(metadata))
    if legacy:  # written before the flat optimizer layout (train/optim_layout.py): its nested group settings
        read = {**read, "optim": legacy_template(flat_template, metadata)}
    grown = swap_position_tables(metadata, read, path, grow_positions)
    check_fits(metadata, read, path, whole_model=runtime.world_size == 1)
    try:
        with _quiet_dcp():
            dcp.load(read, storage_reader=SafeFileSystemReader(str(path)), planner=SafeLoadPlanner())
    except CheckpointCorrupt:
        raise
    except (CheckpointException, RuntimeError, OSError, ValueError, AssertionError, KeyError) as exc:
        if isinstance(exc, (CheckpointException, RuntimeError, OSError)) and peer_lost(exc):
            raise _peer_lost_reading(path, exc) from None  # another rank died mid-read: the files are not blamed
        detail = (_first_failure(exc) if isinstance(exc, CheckpointException)
                  else f"{type(exc).__name__}: {first_line(exc, 300, default='')}")
        raise CheckpointCorrupt(f"checkpoint {path} could not be read: {detail}") from None
    grow_swapped(read, grown, grow_positions)
    if legacy:
        read["optim"] = legacy_to_flat(read["optim"], flat_template, group_fqns(runtime.model, optimizer), str(path))
    if kernels_kept:
        read["optim"].update(kernels_kept)  # this layout's kernels (KERNEL_KEYS) before torch sees the groups
    state = {**read, "model": {**state["model"], **read["model"]}}  # the base's entries as they are (unread)
    if grown:  # for the resume note (trainer.py); not part of the checkpoint
        meta["grown_positions"] = [[tuple(read.shape)[0], tuple(template.shape)[0]] for _, template, read in grown]
    kernels = [{k: g[k] for k in KERNEL_KEYS if k in g} for g in optimizer.param_groups] if optimizer is not None else []
    runtime.load_checkpoint_state(state, optimizer)
    for group, keep in zip(optimizer.param_groups if optimizer is not None else [], kernels):
        group.update(keep)  # this layout's choice, not the writer's (see KERNEL_KEYS)
    rng_file = _rng_file(path, runtime.rank)
    if rng_file.is_file():
        try:
            set_rng_state(torch.load(rng_file, weights_only=True))
        except Exception as exc:  # noqa: BLE001 - a damaged RNG file is one line, never a traceback
            raise CheckpointCorrupt(f"checkpoint file {rng_file} is refused: {type(exc).__name__}: "
                                    f"{first_line(exc, 200, default='')}") from None
    return meta


def _kernel_entries(optim: Any) -> dict[str, Any]:
    """The flat layout's kernel settings (``param_groups.<fqn>.foreach``, ...: KERNEL_KEYS) as this run set them: put
    back after the read, since torch refuses a group whose parameters were saved with different values (a pp stage
    with mixed DTensor/plain parameters turns foreach off, the other stage keeps it)."""
    if not isinstance(optim, dict):
        return {}
    return {k: v for k, v in optim.items() if k.startswith(f"{GROUPS}.") and k.rsplit(".", 1)[-1] in KERNEL_KEYS}


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise CheckpointCorrupt(f"checkpoint file {path} is garbled: {type(exc).__name__}: {str(exc)[:200]}") from None
    if not isinstance(data, dict) or not isinstance(data.get("step"), int) or data["step"] < 0:
        raise CheckpointCorrupt(f"checkpoint file {path} is garbled: no non-negative integer 'step'")
    return data


def _first_failure(exc: CheckpointException) -> str:
    for err, _trace in exc.failures.values():
        lines = str(err).strip().splitlines()
        return f"{type(err).__name__}: {lines[0][:300] if lines else ''}"
    return "unknown DCP failure"


def _is_table_state(key: str) -> str | None:
    """What a flat state key of the learned position table is ("the model" or an AdamW moment), else None. Keys as
    ``checkpoint_state`` flattens them: ``model.pos_embeddings.weight``, ``optim.state.pos_embeddings.weight.exp_avg``
    (torch optimizers through DCP), ``optim.pos_embeddings.weight/exp_avg`` (DeepSpeed)."""
    if key == f"model.{TABLE}":
        return "the model"
    for moment in ("exp_avg", "exp_avg_sq"):
        if key in (f"optim.state.{TABLE}.{moment}", f"optim.{TABLE}/{moment}"):
            return f"optimizer state {moment}"
    return None


Swap = tuple[tuple[Any, ...], torch.Tensor, torch.Tensor]  # (path in the state dict, this run's tensor, the read one)


def swap_position_tables(metadata: Metadata, state: dict[str, Any], path: Path, rule: str | None) -> list[Swap]:
    """Where the checkpoint's learned position table (or its moments) has fewer rows than this model's, put a tensor
    of the saved shape in ``state`` for DCP to read into (``grow_swapped`` grows it after); without a ``rule``, or
    for a smaller model table or other state of it (COAT's quantized moments), one line. Returns the swaps."""
    flat, paths = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    swaps: list[Swap] = []
    for key, value in flat.items():
        if TABLE not in key or not isinstance(value, torch.Tensor) or not isinstance(saved.get(key), TensorStorageMetadata):
            continue
        size = tuple(saved[key].size)
        if size == tuple(value.shape) or len(size) != value.dim() or size[1:] != tuple(value.shape[1:]) or not size:
            continue  # the same table, or another shape change: check_fits names it
        if key == f"model.{TABLE}":  # the model's table: one line naming max_seq_len and the fix
            check_growth(value.shape[0], size[0], rule, f"checkpoint {path}")
        elif rule is None:
            continue  # optimizer state of a table that did not change: check_fits names it
        if value.dim() != 2 or _is_table_state(key) is None:  # e.g. COAT's flat FP8 moments and their group scales
            raise ConfigError(f"grow_positions={rule!r} cannot grow {key.split('.', 1)[-1]!r} of checkpoint {path} "
                              f"(only the table and AdamW's exp_avg/exp_avg_sq grow); valid: optimizer=adamw")
        placeholder = torch.zeros(size, dtype=saved[key].properties.dtype)
        set_element(state, paths[key], placeholder)
        swaps.append((paths[key], value, placeholder))
    return swaps


def grow_swapped(state: dict[str, Any], swaps: list[Swap], rule: str | None) -> None:
    """Put each table read at its saved size back into ``state`` grown to this run's rows, laid out as this run's
    tensor was (a DTensor keeps its mesh and placements: every rank holds the whole read table, so no collective)."""
    for where, template, read in swaps:
        assert rule is not None
        grown = grow_table(read, template.shape[0], rule)
        if isinstance(template, DTensor):
            value: torch.Tensor = distribute_tensor(grown.to(template.device, template.dtype), template.device_mesh,
                                                    template.placements, src_data_rank=None)
        else:
            value = grown.to(template.device, template.dtype)
        set_element(state, where, value)


def check_fits(metadata: Metadata, state: dict[str, Any], path: Path, whole_model: bool = True) -> None:
    """Name, in one line, the first tensor this run needs that the checkpoint lacks or holds in another shape,
    and (when this rank holds the whole model: one process) model tensors the checkpoint has that this model
    lacks: a different model or optimizer. Framework extras (``_extra_state``) are left to DCP."""
    flat, _ = flatten_state_dict(state)
    saved = metadata.state_dict_metadata
    part = {"model": "model parameter", "optim": "optimizer state"}
    for key, value in flat.items():
        kind = part.get(key.split(".", 1)[0], "state")
        if key.endswith("._extra_state"):
            continue
        if key not in saved:
            raise ConfigError(f"resume={str(path)!r} does not fit this run: {kind} {key.split('.', 1)[-1]!r} is not "
                              f"in the checkpoint (different model or optimizer?); valid: a checkpoint of the same "
                              f"model and optimizer")
        if isinstance(value, torch.Tensor) and isinstance(saved[key], TensorStorageMetadata):
            if tuple(saved[key].size) != tuple(value.shape):
                raise ConfigError(f"resume={str(path)!r} does not fit this run: {kind} {key.split('.', 1)[-1]!r} has "
                                  f"shape {tuple(saved[key].size)} in the checkpoint, {tuple(value.shape)} here; "
                                  f"valid: a checkpoint of the same model")
    if not whole_model:  # a pipeline stage holds only its layers
        return
    extra = sorted(k for k in saved if k.startswith("model.") and k not in flat and not k.endswith("._extra_state"))
    if extra:
        raise ConfigError(f"resume={str(path)!r} does not fit this run: the checkpoint has {len(extra)} model "
                          f"tensor(s) this model lacks, e.g. {extra[0].split('.', 1)[1]!r}; valid: a checkpoint of "
                          f"the same model")


def save_checkpoint(root: str | Path, step: int, runtime: Runtime, optimizer: torch.optim.Optimizer,
                    trainer_state: dict[str, Any], keep: int = 3, adapters: AdapterScope | None = None) -> Path:
    """Collective: write checkpoint ``step`` under ``root`` (with RNG), point ``latest`` at it and keep
    the last ``keep`` (pruning only checkpoints of earlier steps, never the one just written). Returns the
    checkpoint's directory."""
    root = Path(root)
    final = save_runtime(step_dir(root, step), runtime, optimizer, {**trainer_state, "step": step}, rng=True,
                         adapters=adapters)
    if runtime.is_main:
        point_and_prune(root, final, step, keep)
    runtime.barrier()
    return final


def point_and_prune(root: Path, final: Path, step: int, keep: int) -> None:
    """Main rank, once ``final`` is complete: point ``latest`` at it (atomically) and keep the last ``keep``
    checkpoints, pruning only those of earlier steps."""
    pointer = root / f"{LATEST}.tmp"
    try:
        pointer.write_text(final.name + "\n")
        os.replace(pointer, root / LATEST)
    except OSError as exc:
        pointer.unlink(missing_ok=True)
        raise _save_error(root / LATEST, exc) from None
    fault_point("ckpt_pointer")
    if keep > 0:
        older = [p for p in list_checkpoints(root) if _step_of(p) < step]
        for old in older[:max(len(older) - (keep - 1), 0)]:
            trash = old.with_name(old.name + ".old")  # out of the listing at once, then deleted
            os.replace(old, trash)
            fault_point("prune")
            shutil.rmtree(trash, ignore_errors=True)
        for leftover in root.glob("step_*.old"):  # a kill mid-prune
            shutil.rmtree(leftover, ignore_errors=True)


def _step_of(path: Path) -> int:
    return int(STEP_RE.match(path.name).group(1))


def list_checkpoints(root: str | Path) -> list[Path]:
    """Complete checkpoints under ``root``, oldest first (``.tmp`` leftovers are ignored)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return sorted(found, key=_step_of)


def _pointer_target(root: Path) -> Path | None:
    """The directory ``latest`` names, or None when it is absent, binary, garbled or names no checkpoint."""
    pointer = root / LATEST
    try:
        name = pointer.read_bytes().decode("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not STEP_RE.match(name):
        return None
    target = root / name
    return target if (target / STATE_FILE).is_file() else None


def latest_checkpoint(root: str | Path) -> Path | None:
    """The checkpoint the ``latest`` pointer names, else the newest complete one, else None."""
    root = Path(root)
    target = _pointer_target(root)
    if target is not None:
        return target
    found = list_checkpoints(root)
    return found[-1] if found else None


def follow_pointer(path: str | Path) -> str | Path:
    """A checkpoint named by the ``latest`` pointer file, or by the ``ckpt/`` directory holding checkpoints, as the
    ``step_*`` directory it means (what users tab-complete to); any other path unchanged, for its own checks."""
    p = Path(path)
    if p.name == LATEST and p.is_file():
        root = p.parent
    elif p.is_dir() and not (p / STATE_FILE).is_file() and ((p / LATEST).is_file() or list_checkpoints(p)):
        root = p
    else:
        return path
    target = latest_checkpoint(root)
    return target if target is not None else path


def resume_candidates(root: str | Path) -> list[Path]:
    """Checkpoints to try on resume, best first: the one ``latest`` names, then the others newest first."""
    root = Path(root)
    first = latest_checkpoint(root)
    rest = [p for p in reversed(list_checkpoints(root)) if p != first]
    return ([first] if first is not None else []) + rest


def load_latest(root: str | Path, runtime: Runtime, optimizer: torch.optim.Optimizer | None,
                warn: Any = None, grow_positions: str | None = None,
                adapters: AdapterScope | None = None) -> tuple[Path, dict[str, Any]] | None:
    """Collective: load the newest checkpoint under ``root`` that is intact; a damaged one is reported with
    ``warn`` (one line) and the previous complete one is tried. None when ``root`` holds none; when all are
    damaged the newest one's error is raised. A checkpoint that does not fit the model is never skipped."""
    candidates = resume_candidates(root)
    first_error: CheckpointCorrupt | None = None
    for path in candidates:
        error = _verify(path, runtime)
        if _agreed_bad(error, runtime):  # every rank takes the same one
            error = error or CheckpointCorrupt(f"checkpoint {path} is damaged on another rank")
            first_error = first_error or error
            if warn is not None and runtime.is_main:
                warn(f"warning: {error.damage}; falling back to the previous checkpoint")
            continue
        return path, load_runtime(path, runtime, optimizer, verify=False, grow_positions=grow_positions,
                                  adapters=adapters)
    if first_error is not None:
        raise first_error
    return None


def _agreed_bad(error: CheckpointCorrupt | None, runtime: Runtime) -> bool:
    """Collective: True on every rank when any rank found damage."""
    return runtime.all_reduce_mean(0.0 if error else 1.0) != 1.0


def _verify(path: Path, runtime: Runtime) -> CheckpointCorrupt | None:
    """Checksums (this rank's share of the files: the ranks split the hashing), trainer state and metadata of
    ``path``, and without checksums the files' sizes against the metadata: the error, or None when intact."""
    try:
        manifest = (path / MANIFEST).is_file()
        if manifest:
            verify_manifest(path, part=(runtime.rank, runtime.world_size))
        _read_json(path / STATE_FILE)
        metadata = read_metadata_file(path / ".metadata")
        if not manifest:  # the manifest has checked every size already
            verify_sizes(path, metadata)
    except CheckpointCorrupt as exc:
        return exc
    return None
