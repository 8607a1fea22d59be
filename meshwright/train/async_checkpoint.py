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

Ctrl-C while a save is waited for (the run already stopping, or the next save), or a Ctrl-C that stopped the
training with a save in flight (``wait(interrupted=True)``): the first one is reported and the wait goes on (the
write finishes, is published, then the run stops as asked); the next one abandons it: nothing of it is published,
the previous checkpoint stays ``latest``, its ``.tmp`` is removed (this run created it; were a writer still to add a
file there as the process ends, resume ignores the ``.tmp`` and the next save removes it), and the CLI exits at once
(exit 130) without tearing the process group down under the writer (``abandoned_write_running``). Where the main
rank's writer is already publishing (checksums, renames: local and short) the abandon waits for that to end; a
further Ctrl-C exits regardless (the publish steps are each atomic). SIGTERM counts as a Ctrl-C here once the run is
interrupted (torchrun answers a second Ctrl-C in its terminal by sending its workers SIGTERM); before that it goes
to the handler it had (preemption: the run stops once this save is in place).

A write that fails because a peer rank died or a collective of the writer's group timed out is reported as that
(peer lost, resume from the previous checkpoint, named), not as an unwritable directory.

Staging memory (``ckpt_staging``): DCP's ``DefaultStager`` keeps its CPU copy of every tensor between saves (keyed
by the source storage) to reuse them; pinning host memory is slow (cudaHostRegister), so on CUDA that reuse is
what makes the next stage a fast copy, at the price of one more copy of the model and optimizer state in host
memory for the whole run. ``free`` (``auto`` on CPU, where nothing is pinned) stages each save with a stager of its
own, closed once the write is on disk, and then asks glibc to hand the freed heap back (``malloc_trim``: the staged
tensors sit below its mmap threshold once one was freed, so without it the process keeps the whole copy resident,
measured); ``keep`` (``auto`` on CUDA) reuses one stager for the run, where this torch's stager can be reused (not
2.11's: ``stager_keeps_buffers``). benchmarks/results/async_checkpoint.md has
the measurement.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import inspect
import shutil
import signal
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from meshwright.train.checkpoint import (  # CheckpointPeerLost, peer_lost: re-exported for the trainer
    CheckpointPeerLost, _quiet_dcp, latest_checkpoint, peer_lost, point_and_prune, prepare_tmp, publish, saved_state, step_dir,
    write_failed, write_small_files,
)
from meshwright.train.lora_base import AdapterScope
from meshwright.train.runtime import Runtime

_ABANDONED: list["_Pending"] = []  # abandoned saves (see abandoned_write_running)


class CheckpointAbandoned(KeyboardInterrupt):
    """A repeated Ctrl-C gave up the save being waited for; nothing of it was published (module docstring)."""


def abandoned_write_running() -> bool:
    """Whether an abandoned save's writer still runs: then the process should end without waiting for it and
    without destroying the process group it uses (the CLI and run_training ask)."""
    return any(not p.done.is_set() for p in _ABANDONED)


def keeps_staging(mode: str) -> bool:
    """``ckpt_staging``: whether the staged CPU copy is kept between saves (``auto``: where it is pinned, CUDA),
    which this torch's stager must be able to do (``stager_keeps_buffers``)."""
    return (mode == "keep" or (mode == "auto" and torch.cuda.is_available())) and stager_keeps_buffers()


@functools.lru_cache(maxsize=1)
def stager_keeps_buffers() -> bool:
    """Whether one ``DefaultStager`` stages a second time into the buffers of the first. torch 2.11's (the GPU
    image's) closes its inner stager at the end of every stage: its buffers are dropped and a second stage fails
    (``KeyError: <class 'type'>`` inside DCP, the second checkpoint of a ``keep`` run; found by torch_compat.sh).
    There ``keep`` stages with a stager per save, as ``free``. Probed on 16 bytes, once."""
    stager = make_stager()
    if stager is None:
        return False
    try:
        src = {"t": torch.arange(4, dtype=torch.float32)}
        first, second = stager.stage(src), stager.stage(src)
        return first["t"].data_ptr() == second["t"].data_ptr()
    except Exception:  # noqa: BLE001 -- any failure of the second stage means: not reusable
        return False
    finally:
        with contextlib.suppress(Exception):
            stager.close()


@functools.lru_cache(maxsize=1)
def _libc() -> Any:
    name = ctypes.util.find_library("c")
    return ctypes.CDLL(name) if name else None


def trim_host_memory() -> None:
    """Hand the heap glibc keeps after frees back to the OS (``ckpt_staging: free``); a no-op without glibc."""
    with contextlib.suppress(OSError, AttributeError):
        libc = _libc()
        if libc is not None:
            libc.malloc_trim(0)


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
    step: int = 0
    thread: threading.Thread | None = None
    error: BaseException | None = None
    started: float = 0.0  # perf_counter when save() began
    stage_s: float = 0.0  # how long save() blocked the step
    write_s: float | None = None  # from save() to the checkpoint in place (None until then)
    lock: threading.Lock = field(default_factory=threading.Lock)
    publishing: bool = False  # the main rank's writer began checksums/renames: it is no longer abandoned
    abandoned: bool = False  # a repeated Ctrl-C gave it up: nothing is published
    # set when the writer thread ends. Waited on instead of Thread.join: Python 3.11's join, interrupted by an
    # exception from a signal handler, releases the running thread's state lock and marks it stopped (bpo-45274)
    done: threading.Event = field(default_factory=threading.Event)


class AsyncCheckpointer:
    """Writes ``save_checkpoint``'s checkpoints in the background; see the module docstring. Constructed on every
    rank at once (it creates its gloo group collectively when a process group is up)."""

    def __init__(self, runtime: Runtime, staging: str = "auto", notify: Callable[[str], None] | None = None) -> None:
        self.runtime = runtime
        self.keep_staging = keeps_staging(staging)
        if staging == "keep" and not self.keep_staging:
            warnings.warn(f"ckpt_staging=keep: torch {torch.__version__}'s DefaultStager cannot stage twice into the "
                          f"same buffers; staging each save on its own (as free)", stacklevel=2)
        self.notify = notify  # where the Ctrl-C lines go (the main rank's print); None: nowhere
        self.last: _Pending | None = None  # the last save that completed (its stage_s and write_s)
        self.group: Any = None
        if dist.is_available() and dist.is_initialized():  # gloo even under NCCL: async_save needs a CPU backend
            from meshwright.parallel.runtime import DEFAULT_TIMEOUT

            self.group = dist.new_group(backend="gloo", timeout=DEFAULT_TIMEOUT)
        else:  # one process on purpose; DCP says so from its writer thread, outside _quiet_dcp's reach
            warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        self._stager = make_stager() if self.keep_staging else None  # free: one per save (save)
        self._pending: _Pending | None = None

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def save(self, root: str | Path, step: int, optimizer: torch.optim.Optimizer, trainer_state: dict[str, Any],
             keep: int = 3, adapters: AdapterScope | None = None) -> Path:
        """Collective: wait for the previous save, stage checkpoint ``step`` to CPU memory, write its RNG files and
        trainer state, and return while the background writes it (``wait`` to be sure it is complete). ``adapters``:
        a LoRA run's scope, as for ``save_checkpoint`` (adapter-only: the base is neither staged nor written)."""
        self.wait()
        started = time.perf_counter()
        root, rt = Path(root), self.runtime
        final = step_dir(root, step)
        tmp = final.with_name(final.name + ".tmp")
        try:
            tmp = prepare_tmp(final, rt)
            state, meta = saved_state(rt, optimizer, {**trainer_state, "step": step}, adapters)
            write_small_files(tmp, rt, meta, rng=True)
            stager = self._stager if self.keep_staging else make_stager()
            kwargs: dict[str, Any] = {"async_stager": stager} if stager is not None else {}
            with _quiet_dcp():
                response = dcp.async_save(state, checkpoint_id=str(tmp),
                                          process_group=self.group, **kwargs)
        except (OSError, RuntimeError, CheckpointException) as exc:
            raise write_failed(tmp, final, exc, rt.is_main) from None
        upload = getattr(response, "upload_completion", response)  # AsyncSaveResponse where staging is async
        pending = _Pending(tmp, final, step, started=started, stage_s=time.perf_counter() - started)
        own = None if self.keep_staging else stager  # free: closed by _finish once the write is on disk
        pending.thread = threading.Thread(target=self._finish, args=(pending, upload, root, step, keep, own),
                                          name=f"meshwright-ckpt-{step}")
        self._pending = pending
        pending.thread.start()
        return final

    def _finish(self, pending: _Pending, upload: Any, root: Path, step: int, keep: int, own_stager: Any) -> None:
        """Background: wait for DCP's write, then (main rank) checksums, rename, ``latest`` and pruning; with
        ``ckpt_staging: free`` the save's own stager is closed and the freed memory handed back."""
        try:
            upload.result()  # every rank's files and .metadata are written once this returns (module docstring)
            if own_stager is not None:
                own_stager.close()
                del own_stager
            with pending.lock:
                if pending.abandoned:
                    return
                pending.publishing = True
            if self.runtime.is_main:
                publish(pending.tmp, pending.final)
                point_and_prune(root, pending.final, step, keep)
            pending.write_s = time.perf_counter() - pending.started
            if not self.keep_staging:  # after the publish: DCP's worker has dropped the staged dict by then
                trim_host_memory()
        except BaseException as exc:  # noqa: BLE001 - handed to wait(), which raises it on the training thread
            pending.error = exc
        finally:
            pending.done.set()

    def wait(self, interrupted: bool = False) -> Path | None:
        """Block until the save in flight (if any) is complete and in place; raise its error as one line.
        Returns the checkpoint's directory, or None when nothing was in flight. Ctrl-C meanwhile, and
        ``interrupted`` (a Ctrl-C already stopped the run: the next one abandons the save): module docstring."""
        pending = self._pending
        if pending is None:
            return None
        try:
            interrupted = self._join(pending, interrupted)
        except CheckpointAbandoned:
            self._pending = None
            _ABANDONED.append(pending)
            if pending.abandoned:  # nothing of it will be published: its partial files go (module docstring)
                shutil.rmtree(pending.tmp, ignore_errors=True)
            raise
        self._pending = None
        if pending.error is not None:
            exc = pending.error
            if isinstance(exc, (OSError, RuntimeError, CheckpointException)):
                raise write_failed(pending.tmp, pending.final, exc, self.runtime.is_main) from None
            raise exc
        self.last = pending
        if interrupted:  # the Ctrl-C pressed during the wait: the run stops, with this checkpoint in place
            raise KeyboardInterrupt
        return pending.final

    def _join(self, pending: _Pending, interrupted: bool = False) -> bool:
        """Join the writer. On the main thread, Ctrl-C (or SIGTERM once interrupted) meanwhile is reported, then
        abandons the save (module docstring); returns whether one was pressed. ``interrupted``: one was, before."""
        thread = pending.thread
        if thread is None or thread.ident is None:  # a Ctrl-C in save() before it started: nothing to wait for
            return False
        if threading.current_thread() is not threading.main_thread():
            thread.join()
            return False
        presses = 0
        before = latest_checkpoint(pending.final.parent)
        keeps = f"{before.name} stays the latest checkpoint" if before is not None else "there is no earlier checkpoint"
        say = self.notify or (lambda line: None)
        previous_term = signal.getsignal(signal.SIGTERM)  # None: not set from Python (the default then)

        def on_interrupt(signum: int, frame: Any) -> None:
            nonlocal presses
            if signum == signal.SIGTERM and presses == 0 and callable(previous_term):
                previous_term(signum, frame)  # preemption records it: the run stops once this save is in place
                return
            presses += 1
            if presses == 1:
                say(f"still finishing checkpoint step {pending.step} (written in the background); press Ctrl-C "
                    f"again to abandon it ({keeps})")
                return
            with pending.lock:
                if not pending.publishing:
                    pending.abandoned = True
            if pending.abandoned or presses > 2:
                line = (f"abandoned checkpoint step {pending.step}: {keeps}; its partial {pending.tmp.name} is "
                        f"removed" if pending.abandoned else
                        f"exiting while checkpoint step {pending.step} is put in place; resume takes the newest "
                        f"complete checkpoint")
                say(line)
                raise CheckpointAbandoned(line)
            say(f"checkpoint step {pending.step} is being put in place (checksums, rename), a moment; press "
                f"Ctrl-C again to exit at once")

        if interrupted:  # the Ctrl-C that stopped the run counts as the first press
            on_interrupt(signal.SIGINT, None)
        previous = signal.signal(signal.SIGINT, on_interrupt)
        signal.signal(signal.SIGTERM, on_interrupt)
        try:
            pending.done.wait()  # an Event, not thread.join: see _Pending.done
        finally:
            signal.signal(signal.SIGINT, previous)
            signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
        thread.join()  # it has ended (done is set last)
        return presses > 0

    def close(self, interrupted: bool = False) -> None:
        """Wait for the save in flight (``interrupted``: see ``wait``) and free the staging buffers."""
        try:
            self.wait(interrupted)
        finally:
            if self._stager is not None:
                with contextlib.suppress(Exception):
                    self._stager.close()
                self._stager = None
