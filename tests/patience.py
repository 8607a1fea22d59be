"""Time limits for tests that wait on other processes, scaled with the box's load.

A bound such as "the ranks exit within 20 s" is measured on a quiet machine; on a loaded one (CI's neighbours, eight
engineers on 2 cores) the same work takes many times longer and the test turns red by chance. A bound here is stated
for a quiet box and stretched by how loaded the box is (the 1-minute load average per CPU), up to ``MAX_STRETCH``
times: on a quiet box (CI) it is the nominal bound, so a regression (a rank waiting for torchrun's SIGKILL, a gloo
timeout) still fails there; under load a slow rank is not a failure, and a real hang still fails in bounded time.
"""

from __future__ import annotations

import os
import subprocess
import time
from datetime import timedelta
from typing import Callable

MAX_STRETCH = 10.0  # a hang fails within 10x its quiet-box bound, however loaded the box


def stretch() -> float:
    """How many times longer than on a quiet box a wait may take now: the 1-minute load average per CPU (runnable
    tasks share the CPUs), between 1 and ``MAX_STRETCH``."""
    try:
        load = os.getloadavg()[0]
    except OSError:  # no load average (not Linux): the quiet-box bounds
        return 1.0
    return min(MAX_STRETCH, max(1.0, load / (os.cpu_count() or 1)))


def scaled(seconds: float) -> float:
    """``seconds`` (a quiet box's bound) stretched by the load now: for limits set once, up front (a gloo timeout,
    torchrun's shutdown timeout, a ``communicate(timeout=)``)."""
    return seconds * stretch()


def scaled_env_s(seconds: float) -> str:
    """``scaled(seconds)`` as whole seconds, for an environment variable (MESHWRIGHT_PG_TIMEOUT_S,
    TORCH_ELASTIC_SHUTDOWN_TIMEOUT)."""
    return str(int(scaled(seconds) + 0.5))


def pg_timeout(seconds: float) -> timedelta:
    """A process group's timeout: ``seconds`` on a quiet box, stretched under load (a rank slowed by its
    neighbours is not a failure; a collective that never completes still fails, later)."""
    return timedelta(seconds=scaled(seconds))


class Patience:
    """A wait of ``seconds`` of quiet-box time: the clock advances by wall time times the share of a CPU a runnable
    process gets (CPUs / load average, at most 1), re-read at every check, so a wait that spans a burst of load is
    given the time the burst took; at most ``MAX_STRETCH`` x ``seconds`` of wall time in all."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.start = self.last = time.monotonic()
        self.quiet_s = 0.0  # quiet-box seconds elapsed

    def _tick(self) -> None:
        now = time.monotonic()
        self.quiet_s += (now - self.last) / stretch()
        self.last = now

    def expired(self) -> bool:
        self._tick()
        return self.quiet_s >= self.seconds or self.last - self.start >= self.seconds * MAX_STRETCH

    def waited(self) -> str:
        """What was waited, for a failure message."""
        return (f"{self.last - self.start:.0f} s of wall time ({self.quiet_s:.0f} s of quiet-box time at the box's "
                f"load; the bound: {self.seconds:g} s, at most {self.seconds * MAX_STRETCH:g} s of wall time)")

    def until(self, done: Callable[[], bool], poll: float = 0.05) -> bool:
        """Poll ``done`` until it holds (True) or this wait expires (False)."""
        while not done():
            if self.expired():
                return bool(done())
            time.sleep(poll)
        return True


def until(done: Callable[[], bool], seconds: float, poll: float = 0.05) -> bool:
    """Whether ``done()`` came true within ``seconds`` of quiet-box time (Patience)."""
    return Patience(seconds).until(done, poll)


def communicate(proc: subprocess.Popen, seconds: float) -> tuple[str, str]:
    """``proc.communicate()`` within ``seconds`` of quiet-box time (Patience); on expiry ``subprocess.TimeoutExpired``
    as from ``communicate(timeout=)``, the process left running for the caller to kill (output is not lost: a
    timed-out ``communicate`` may be called again)."""
    patience = Patience(seconds)
    while True:
        try:
            return proc.communicate(timeout=1.0)
        except subprocess.TimeoutExpired:
            if patience.expired():
                raise subprocess.TimeoutExpired(proc.args, patience.last - patience.start) from None


def wait(proc: subprocess.Popen, seconds: float) -> int:
    """``proc.wait()`` within ``seconds`` of quiet-box time (Patience); on expiry ``subprocess.TimeoutExpired``."""
    patience = Patience(seconds)
    if not patience.until(lambda: proc.poll() is not None):
        raise subprocess.TimeoutExpired(proc.args, patience.last - patience.start)
    return proc.returncode
