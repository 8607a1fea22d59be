"""tests/patience.py: quiet-box bounds stretched by the box's load, and helpers.address_in_use (the launches'
one retry on a rendezvous port taken between free_port() and the bind)."""

from __future__ import annotations

import subprocess
import sys

import pytest

import patience
from helpers import address_in_use


@pytest.mark.parametrize("load,cpus,expected", [(0.5, 2, 1.0), (2.0, 2, 1.0), (8.0, 2, 4.0), (400.0, 2, 10.0)])
def test_stretch_is_the_load_per_cpu_between_1_and_the_cap(monkeypatch, load, cpus, expected):
    monkeypatch.setattr(patience.os, "getloadavg", lambda: (load, 0.0, 0.0))
    monkeypatch.setattr(patience.os, "cpu_count", lambda: cpus)
    assert patience.stretch() == expected
    assert patience.scaled(20) == 20 * expected
    assert patience.pg_timeout(60).total_seconds() == 60 * expected
    assert patience.scaled_env_s(30) == str(round(30 * expected))


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_patience_counts_quiet_box_time_and_still_ends_a_hang(monkeypatch):
    """On a quiet box the bound is the wall-clock bound; at 4x load a wait gets 4x the time; however loaded the box,
    a wait ends after MAX_STRETCH x its bound of wall time (a hang still fails)."""
    clock, factor = Clock(), [1.0]
    monkeypatch.setattr(patience.time, "monotonic", clock)
    monkeypatch.setattr(patience, "stretch", lambda: factor[0])
    quiet = patience.Patience(20)
    clock.now += 19.9
    assert not quiet.expired()
    clock.now += 0.2
    assert quiet.expired()

    factor[0] = 4.0
    loaded = patience.Patience(20)
    clock.now += 79
    assert not loaded.expired()
    clock.now += 2
    assert loaded.expired() and "81 s of wall time" in loaded.waited()

    burst = patience.Patience(20)  # 10 s quiet, then 40 s at 4x (10 s of quiet-box time): 20 s in all
    factor[0] = 1.0
    clock.now += 10
    assert not burst.expired()
    factor[0] = 4.0
    clock.now += 39
    assert not burst.expired()
    clock.now += 2
    assert burst.expired()

    factor[0] = 1e9  # a stretch beyond the cap (stretch() itself caps it): the wall-clock cap ends the wait
    hang = patience.Patience(20)
    clock.now += 20 * patience.MAX_STRETCH - 1
    assert not hang.expired()
    clock.now += 1
    assert hang.expired()


def test_communicate_returns_the_output_or_times_out_leaving_the_process(monkeypatch):
    monkeypatch.setattr(patience, "stretch", lambda: 1.0)
    proc = subprocess.Popen([sys.executable, "-c", "print('done')"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert patience.communicate(proc, 60) == ("done\n", "")
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('partial', flush=True); time.sleep(60)"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with pytest.raises(subprocess.TimeoutExpired):
            patience.communicate(proc, 2)
        assert proc.poll() is None  # left for the caller to kill; its output is not lost
    finally:
        proc.kill()
    assert proc.communicate()[0] == "partial\n"


def test_address_in_use_is_the_stores_bind_failure_only():
    said = ("torch.distributed.DistNetworkError: The server socket has failed to listen on any local network "
            "address. port: 41234, useIpv6: false, code: -98, name: EADDRINUSE, message: address already in use")
    assert address_in_use(said) and address_in_use("OSError: [Errno 98] Address already in use")
    assert not address_in_use("RuntimeError: Connection closed by peer [127.0.0.1]:41234")
    assert not address_in_use("")
