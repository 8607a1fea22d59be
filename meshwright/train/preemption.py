"""Stop at a step boundary with a checkpoint when a scheduler asks (SIGTERM, SIGUSR1), not lose the run.

Why: schedulers preempt with SIGTERM some seconds before SIGKILL (Slurm also sends SIGUSR1 ahead with
``--signal``; torchrun's agent passes SIGTERM on to its workers and kills them 30 s later). Dying there lost every
step since the last checkpoint: with the default ``ckpt_every: 0``, the whole run. The handler only records the
signal; the trainer asks :meth:`Preemption.agreed` after every step and, when it says yes, finishes the step in
flight, writes a checkpoint and returns. Ranks receive a signal at different moments, so with several ranks each
step's flags are all-reduced (max) in the background on a gloo group of their own, on the host (no wait for the
GPU, whose steps the trainer overlaps), and read one step later: every rank stops after the same step.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any, Optional

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 128 + signal.SIGTERM  # what a process killed by SIGTERM reports: the run is not finished


class Preemption:
    """A context that records STOP_SIGNALS while it is open (main thread only: Python delivers signals there) and
    restores the previous handlers on exit. Opened on every rank at once: with several ranks it creates its gloo
    group, collectively."""

    def __init__(self, world_size: int = 1) -> None:
        self.signum: Optional[int] = None
        self.world_size = world_size
        self._previous: dict[int, Any] = {}
        self._group: Any = None
        self._pending: Any = None  # (work, flag) of the last step's all-reduce
        self._open = False  # outside the context nothing is asked of the other ranks

    def __enter__(self) -> "Preemption":
        if self.world_size > 1:
            import torch.distributed as dist

            from meshwright.parallel.runtime import DEFAULT_TIMEOUT

            self._group = dist.new_group(backend="gloo", timeout=DEFAULT_TIMEOUT)
        self._open = True
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._record)
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        if self._pending is not None:  # every rank issued it: finish it, so no collective is left in flight
            self._pending[0].wait()
            self._pending = None
        self._open = False

    def _record(self, signum: int, frame: Optional[FrameType]) -> None:
        self.signum = signum

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
            decided = bool(flag.item() > 0.0)
        flag = torch.tensor([1.0 if local else 0.0])
        self._pending = (dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group, async_op=True), flag)
        return decided

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else "a signal on another rank"
