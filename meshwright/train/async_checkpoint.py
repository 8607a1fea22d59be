"""Checkpoints written in the background (``ckpt_async: true``): the step waits for a copy of the state in CPU
memory, not for the disk, as torchtitan's ``checkpoint.async_mode`` does.

Why: a synchronous save stalls every rank for the whole write (seconds to minutes for large models). Here
``save`` stages the model and optimizer state to CPU memory (pinned on CUDA) with DCP's ``async_save`` and returns;
DCP writes the staged copy in a background thread over a gloo group of its own (created once, collectively), so
its collectives never interleave with the training ones. The copy is taken before ``save`` returns, that is before
the next optimizer step changes a parameter (tests/unit/test_async_checkpoint.py holds the writer back over later
steps and checks the checkpoint against the synchronous one). The RNG files and trainer_state.json are small and
written before returning.

Atomicity is the synchronous path's (checkpoint.py): everything goes into ``<step>.tmp``. DCP's save returns on a
rank only after its coordinator (the main rank) gathered every rank's write results and wrote ``.metadata``, so
when it returns on the main rank every rank's files are on disk; only then does the main rank's background thread
write the checksums, rename the directory into place, move ``latest`` and prune. A kill before that leaves a
``.tmp``, which resume ignores (it takes the previous complete checkpoint). At most one save is in flight:
the next ``save``, the end of fit, preemption and the error path ``wait`` for it first (and raise its error).
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from meshwright.train.checkpoint import (
    _quiet_dcp, point_and_prune, prepare_tmp, publish, step_dir, write_failed, write_small_files,
)
from meshwright.train.runtime import Runtime


def make_stager() -> Any:
    """DCP's stager copying every tensor into CPU memory before ``async_save`` returns (pinned, non-blocking
    copies and one synchronise on CUDA); it keeps its buffers between saves. None where this torch lacks
    ``DefaultStager`` or ``async_save(async_stager=)`` (then ``async_save`` stages with its own default, also a CPU
    copy, before returning)."""
    if "async_stager" not in inspect.signature(dcp.async_save).parameters:
        return None
    try:
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        cuda = torch.cuda.is_available()
        return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False, use_async_staging=False,
                                            use_non_blocking_copy=cuda))
    except (ImportError, TypeError):
        return None


@dataclass
class _Pending:
    """One save in flight: DCP's upload future and the thread that finishes the checkpoint after it."""

    tmp: Path
    final: Path
    thread: threading.Thread | None = None
    error: BaseException | None = None


class AsyncCheckpointer:
    """Writes ``save_checkpoint``'s checkpoints in the background; see the module docstring. Constructed on every
    rank at once (it creates its gloo group collectively when a process group is up)."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.group: Any = None
        if dist.is_available() and dist.is_initialized():  # gloo even under NCCL: async_save needs a CPU backend
            from meshwright.parallel.runtime import DEFAULT_TIMEOUT

            self.group = dist.new_group(backend="gloo", timeout=DEFAULT_TIMEOUT)
        else:  # one process on purpose; DCP says so from its writer thread, outside _quiet_dcp's reach
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        self._stager = make_stager()
        self._pending: _Pending | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(self, root: str | Path, step: int, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
             keep: int = 3) -> Path:
        """Collective: wait for the previous save, stage checkpoint ``step`` to CPU memory, write its RNG files and
        trainer state, and return while the background writes it (``wait`` to be sure it is complete)."""
        self.wait()
        root, rt = Path(root), self.runtime
        final = step_dir(root, step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            tmp = prepare_tmp(final, rt)
            write_small_files(tmp, rt, {**trainer_state, "step": step}, rng=True)
            kwargs: dict[str, Any] = {"async_stager": self._stager} if self._stager is not None else {}
            with _quiet_dcp():
                response = dcp.async_save(rt.checkpoint_state(optimizer), checkpoint_id=str(tmp),
                                          process_group=self.group, **kwargs)
        except (OSError, RuntimeError, CheckpointException) as exc:
            raise write_failed(tmp, final, exc, rt.is_main) from None
        upload = getattr(response, "upload_completion", response)  # AsyncSaveResponse where staging is async
        pending = _Pending(tmp, final)
        pending.thread = threading.Thread(target=self._finish, args=(pending, upload, root, step, keep),
                                          name=f"meshwright-ckpt-{step}")
        self._pending = pending
        pending.thread.start()
        return final

    def _finish(self, pending: _Pending, upload: Any, root: Path, step: int, keep: int) -> None:
        """Background: wait for DCP's write, then (main rank) checksums, rename, ``latest`` and pruning."""
        try:
            upload.result()  # every rank's files and .metadata are written once this returns (module docstring)
            if self.runtime.is_main:
                publish(pending.tmp, pending.final)
                point_and_prune(root, pending.final, step, keep)
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), which raises it on the training thread
            pending.error = exc

    def wait(self) -> Path | None:
        """Block until the save in flight (if any) is complete and in place; raise its error as one line.
        Returns the checkpoint's directory, or None when nothing was in flight."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        if pending.thread is not None:
            pending.thread.join()
        if pending.error is not None:
            exc = pending.error
            if isinstance(exc, (OSError, RuntimeError, CheckpointException)):
                raise write_failed(pending.tmp, pending.final, exc, self.runtime.is_main) from None
            raise exc
        return pending.final

    def close(self) -> None:
        """Wait for the save in flight and free the staging buffers."""
        try:
            self.wait()
        finally:
            if self._stager is not None:
                with contextlib.suppress(Exception):
                    self._stager.close()
                self._stager = None
