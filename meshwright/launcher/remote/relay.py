"""Pass a scheduler's stop (SIGTERM or SIGUSR1 to ``meshwright launch``) on to every host's torchrun as that signal.

Why: an SSH pty carries only what a terminal can (Ctrl-C as SIGINT, a hang-up as SIGHUP). SIGTERM to the launch
(Slurm's scancel or preemption, Kubernetes, any scheduler stopping the process it started) used to be passed on as
Ctrl-C: every rank stopped inside its step without a new checkpoint, losing up to ``ckpt_every`` steps. Now each
host's command reports its process group first (``argv.PGID_MARKER``) and the signal is sent to that group by a
second command on the host's connection, already key-authenticated and host-key-checked (``signal_group_command``:
an integer > 1 parsed from the host's line, digits only, and a fixed signal name; no text a host sent goes into it
as text). torchrun passes it on to its ranks
(``--signals-to-handle``), they stop after the same step with a checkpoint (``preempt_signals``) and torchrun waits
for them (its shutdown timeout: argv.shutdown_timeout_for) as under a local torchrun. Only the first stop signal is passed on: the ranks
already stop, and torchrun takes each signal in that wait as a new shutdown (SIGTERM to the ranks again, another
30 s: torch 2.13's ``agent.run`` and ``_close``); a third would end its wait and leave the ranks unsupervised.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Callable, Iterator

from meshwright.launcher.remote.argv import signal_group_command

# the signals passed on as themselves: every scheduler's stop, and Slurm's usual --signal choice
PASSED_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class LaunchStopped(Exception):
    """Every host has ended after the launch passed a stop signal on to it (``signum``): the run is not finished,
    its ranks were asked to stop with a checkpoint. ``missed``: hosts the signal could not be sent to (hung up
    instead), ``started``: False when the signal came before any host's torchrun started (none was)."""

    def __init__(self, signum: int, missed: list[str] | None = None, started: bool = True,
                 via: str = "passed on to every host's torchrun") -> None:
        self.signum, self.missed, self.started, self.via = signum, list(missed or []), started, via
        super().__init__(signal.Signals(signum).name)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    def message(self) -> str:
        """The launch's last line (exit 143)."""
        if not self.started:
            return f"{self.name} received before any host started: nothing was started"
        missed = (f"; {', '.join(self.missed)} could not be reached and were hung up on instead (SIGHUP: their ranks "
                  f"stop the same way)") if self.missed else ""
        return (f"stopped by {self.name}: {self.via}; the ranks stop after the same step with a checkpoint (the "
                f"run's `stopped at step N` line){missed}; continue with the same launch and `-- train ... --resume`")


class StopRelay:
    """Records the stop signals the launch receives (its handler only records: the launch's loop acts) and sends the
    first one to each running host's process group once that host has reported it, one thread per host so that a
    host gone silent holds nothing up."""

    def __init__(self, hosts: list[str], conns: list[Any], pgid_of: Callable[[int], int | None],
                 say: Callable[[str], None], timeout: float) -> None:
        self.hosts, self.conns, self.pgid_of, self.say, self.timeout = hosts, conns, pgid_of, say, timeout
        self.received: list[int] = []
        self.signum: int | None = None
        self._seen = 0
        self._threads: dict[int, threading.Thread] = {}
        self._failed: dict[int, str] = {}
        self.missed: list[int] = []  # hosts the signal could not be sent to: hung up on instead

    def record(self, signum: int, frame: object) -> None:
        self.received.append(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator["StopRelay"]:
        """Record PASSED_SIGNALS while open (main thread only, where Python delivers signals); restore on exit."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        previous = {s: signal.signal(s, self.record) for s in PASSED_SIGNALS}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler if handler is not None else signal.SIG_DFL)

    def first_received(self) -> int | None:
        return self.received[0] if self.received else None

    def pass_on(self, running: list[bool], interrupted: bool) -> None:
        """One turn of the launch's loop: say what each newly received signal does, send the stop to every running
        host whose process group is known and not yet signalled, and hang up on a host it could not be sent to."""
        for signum in self.received[self._seen:]:
            name = signal.Signals(signum).name
            if self.signum is None and not interrupted:
                self.signum = signum
                self.say(f"meshwright launch: {name} passed on to the torchrun of every host still running: their ranks "
                         f"stop after the same step with a checkpoint; waiting for them")
            elif self.signum is None:
                self.say(f"meshwright launch: {name} not passed on: the hosts are already stopping after Ctrl-C")
            else:
                self.say(f"meshwright launch: {name} not passed on: {signal.Signals(self.signum).name} already was; "
                         f"waiting for the hosts' checkpoints")
        self._seen = len(self.received)
        if self.signum is None:
            return
        for i, alive in enumerate(running):
            if not alive:
                continue
            if i in self._failed and i not in self.missed:
                self.missed.append(i)
                self.say(f"meshwright launch: could not pass {signal.Signals(self.signum).name} on to host "
                         f"{self.hosts[i]} ({self._failed[i]}); hanging up on it instead (SIGHUP: its ranks stop the "
                         f"same way)")
                with contextlib.suppress(Exception):
                    self.conns[i].close()
                continue
            pgid = self.pgid_of(i)
            if i in self._threads or pgid is None:  # not started yet: sent once it has reported its process group
                continue
            t = threading.Thread(target=self._send, args=(i, pgid, signal.Signals(self.signum).name[3:]), daemon=True,
                                 name=f"meshwright-stop-{self.hosts[i]}")
            self._threads[i] = t
            t.start()

    def _send(self, i: int, pgid: int, name: str) -> None:
        try:
            result = self.conns[i].run(signal_group_command(pgid, name), pty=False, warn=True, hide=True,
                                       in_stream=False, timeout=self.timeout)
            if result.exited != 0:
                lines = (result.stderr or result.stdout or "").strip().splitlines()
                self._failed[i] = lines[-1] if lines else f"exit {result.exited}"
        except Exception as exc:  # noqa: BLE001 - a connection gone: said, and the host hung up on, by pass_on
            self._failed[i] = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
