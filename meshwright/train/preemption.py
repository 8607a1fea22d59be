"""Stop at a step boundary with a checkpoint when a scheduler asks (SIGTERM, SIGUSR1) or the terminal hangs up
(SIGHUP), not lose the run.

Why: schedulers preempt with SIGTERM some seconds before SIGKILL (Slurm also sends SIGUSR1 ahead with
``--signal``; torchrun's agent passes SIGTERM on to its workers and kills them 30 s later); a dropped SSH
connection hangs up the run's terminal, and the kernel (or torchrun, passing it on) sends SIGHUP. Dying there lost
every step since the last checkpoint: with the default ``ckpt_every: 0``, the whole run. Which signals stop the run
is ``preempt_signals`` (TrainConfig; default ``DEFAULT_SIGNALS``); whichever it was, the exit status is 143.
The handler only records the signal; the trainer asks :meth:`Preemption.agreed` after every step and, when it says
yes, finishes the step in flight, writes a checkpoint and returns. Ranks receive a signal at different moments,
so with several ranks each step's flags are all-reduced (max) in the background on a gloo group of their own, on
the host (no wait for the GPU, whose steps the trainer overlaps), and read one step later: every rank stops after
the same step.

The grace: a stop takes the rest of the steps to the agreed boundary (one, one more for the lagged all-reduce with
several ranks, one more where the trainer overlaps read-backs) and the checkpoint, all before the scheduler's
SIGKILL (torchrun: 30 s after SIGTERM; Slurm: the ``--signal`` lead). ``preempt_grace_s`` names that time; the
trainer measures its steps and checkpoints and, once a stop would not fit (``grace_warning``), warns once and asks
for eager agreement: the flag is all-reduced and read in the same step (Megatron's ``--exit-signal-handler`` checks
every iteration synchronously the same way), one step sooner for the price of a host rendezvous per step, which is
nothing next to steps that long. The request itself travels in the lagged all-reduce, so every rank switches at
the same step.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from datetime import timedelta
from types import FrameType
from typing import Any, Iterable, Optional

# SIGTERM: every scheduler's stop and torchrun's; SIGUSR1: Slurm's --signal (Lightning's choice too); SIGHUP: a hang-up.
# Each one's default action kills the process at once, so taking them loses nothing a user relied on.
DEFAULT_SIGNALS = ("SIGTERM", "SIGUSR1", "SIGHUP")
# what preempt_signals may name (SIGUSR2: submitit's --signal). Not SIGINT, Ctrl-C's (stop in the step, no new
# checkpoint), nor SIGKILL/SIGSTOP (they cannot be caught); the other signals are no stop requests
STOPPABLE = ("SIGTERM", "SIGUSR1", "SIGUSR2", "SIGHUP", "SIGQUIT")
STOP_SIGNALS = tuple(signal.Signals[s] for s in DEFAULT_SIGNALS)
EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: the run is not finished
EXIT_WAIT_S = 5.0  # how long leaving on an error waits for the last step's flag all-reduce (a peer interrupted too)


class Preemption:
    """A context that records ``signals`` (default STOP_SIGNALS) while it is open (main thread only: Python delivers
    signals there) and restores the previous handlers on exit. Opened on every rank at once: with several ranks it
    creates its gloo group, collectively."""

    def __init__(self, world_size: int = 1, signals: Iterable[str | int] = DEFAULT_SIGNALS) -> None:
        self.signals = tuple(signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals)
        self._ttys: tuple[int, ...] = ()  # stdout/stderr where they were terminals at __enter__ (SIGHUP)
        self.signum: Optional[int] = None
        self.received_at: Optional[float] = None  # time.monotonic() at this rank's first signal
        self.world_size = world_size
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._pending: Any = None  # (work, flag) of the last step's all-reduce
        self._open = False  # outside the context nothing is asked of the other ranks
        self.want_eager = False  # this rank asks for stops decided in the same step (grace_warning)
        self.eager = False  # agreed by every rank (one step after any rank asked)
        self._hold = False  # hold(): the handlers outlive the context, until release()

    def __enter__(self) -> "Preemption":
        if self.world_size > 1:
            import torch.distributed as dist

            from meshwright.parallel.runtime import DEFAULT_TIMEOUT

            self._group = dist.new_group(backend="gloo", timeout=DEFAULT_TIMEOUT)
        self._open = True
        if threading.current_thread() is threading.main_thread():
            self._ttys = tuple(fd for fd in (1, 2) if _isatty(fd))
            for s in self.signals:
                if signal.getsignal(s) is signal.SIG_IGN:  # `nohup`'s SIGHUP: the user asked for the run to go on
                    continue
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        if not self._hold or exc_type is not None:
            self.release()
        pending, self._pending, self._open = self._pending, None, False
        if pending is None:
            return
        if exc_type is None:  # every rank issued it: finish it, so no collective is left in flight
            pending[0].wait()
            return
        # leaving on an error (Ctrl-C, a peer lost): the other ranks may never issue this step's all-reduce, or be
        # gone; its failure must not replace the error on its way out, nor its wait hold this rank until the timeout
        with contextlib.suppress(Exception):
            pending[0].wait(timedelta(seconds=EXIT_WAIT_S))

    def hold(self) -> None:
        """Keep recording the signals after the context closes, until :meth:`release` (a clean exit only). A stop's
        checkpoint is written after the loop, and the signal may reach this rank only then: each host gets it at its
        own moment (a scheduler's, or ``meshwright launch`` passing it to each host in turn) and the ranks stop on the
        first one's flag. Its default action killed the rank in that checkpoint (measured: two hosts, SIGUSR1 0.4 s
        apart, the step-14 save lost with a peer-lost error on the other rank)."""
        self._hold = True

    def close(self) -> None:
        """Let go of the gloo group and the last step's all-reduce (its work holds the group) before the process group
        is destroyed (parallel/teardown.py); the handlers too (``release``). Idempotent."""
        self.release()
        self._pending, self._group = None, None

    def release(self) -> None:
        """Restore the handlers the context replaced (idempotent)."""
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        self._hold = False

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
        self.signum = signum
        if signum == signal.SIGHUP:
            self._silence_hung_up_terminal()

    def _silence_hung_up_terminal(self) -> None:
        """A hung-up terminal fails every write with EIO: the next progress line would have ended the run with an
        OSError before its checkpoint. Its stdout/stderr (terminals at ``__enter__``, no longer answering as one: the
        kernel refuses a hung-up terminal's ioctls) go to /dev/null; log.jsonl and the summary keep the record. Files
        and pipes (torchrun --tee, a redirect) and a terminal still there are left alone."""
        gone = [fd for fd in self._ttys if not _isatty(fd)]
        if not gone:
            return
        null = os.open(os.devnull, os.O_WRONLY)
        try:
            for fd in gone:
                os.dup2(null, fd)
        finally:
            os.close(null)

    def took(self) -> str:
        """How long this stop took, from this rank's signal to now (the checkpoint in place), for the stop's line:
        what preempt_grace_s must cover. Empty where the signal came to another rank."""
        if self.received_at is None:
            return ""
        return f" ({time.monotonic() - self.received_at:.1f} s after the signal; preempt_grace_s must cover that)"

    def agreed(self) -> bool:
        """Whether every rank stops now: this rank's flag in one process; with several ranks, whether any rank had a
        signal at the previous call (the all-reduce issued then is read now, and this call's is issued). The same
        answer on every rank, each called once per step."""
        local = self.signum is not None
        if not self._open:
            return False
        if self.world_size == 1:
            return local
        import torch
        import torch.distributed as dist

        decided = False
        if self._pending is not None:
            work, flag = self._pending
            work.wait()
            decided = bool(flag[0].item() > 0.0)
            self.eager = self.eager or bool(flag[1].item() > 0.0)  # the same on every rank, at the same call
            self._pending = None
        flag = torch.tensor([1.0 if local else 0.0, 1.0 if self.want_eager else 0.0])
        work = dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True)
        if self.eager:  # read now: the stop is decided at this step
            work.wait()
            return decided or bool(flag[0].item() > 0.0)
        self._pending = (work, flag)
        return decided

    def steps_to_boundary(self, overlapped: bool) -> int:
        """At most how many step times pass between a signal and the step boundary the stop is agreed at: the
        step running, one more while the all-reduce lags (several ranks, not eager), one more queued ahead of the
        read-back (``overlapped``)."""
        return 1 + int(self.world_size > 1 and not self.eager) + int(overlapped)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"


def _isatty(fd: int) -> bool:
    try:
        return os.isatty(fd)
    except OSError:
        return False


def grace_warning(grace_s: float, step_s: float, ckpt_s: float | None, steps: int, sooner: bool,
                  ckpt_async: bool = False) -> str | None:
    """The one line to print when a stop (``steps`` steps of ``step_s`` to the boundary, then a checkpoint of
    ``ckpt_s``, None while none was timed) would not fit ``grace_s``; None when it fits or the check is off (0).
    ``sooner``: eager agreement will take a step off (several ranks). ``ckpt_async``: already on, so not advised."""
    need = steps * step_s + (ckpt_s or 0.0)
    if grace_s <= 0 or need <= grace_s:
        return None
    ckpt = f"the checkpoint {ckpt_s:.1f} s" if ckpt_s is not None else "the checkpoint (not timed yet)"
    return (f"warning: a stop (SIGTERM/SIGUSR1) may take {need:.1f} s here ({steps} step(s) of {step_s:.1f} s to the "
            f"step boundary + {ckpt}), more than preempt_grace_s={grace_s:g}: the scheduler may kill the run before "
            f"its checkpoint is in place{'; stops are now decided one step sooner' if sooner else ''}; valid: an "
            f"earlier signal "
            f"(Slurm --signal=USR1@{math.ceil(need * 1.5)}) with preempt_grace_s set to its lead, "
            f"{'' if ckpt_async else 'ckpt_async, '}or a smaller ckpt_every so less is lost")
