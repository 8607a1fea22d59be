"""tests/helpers.py free_port: a port below the kernel's ephemeral range (one from bind(0) can be taken by any
outgoing connection between the test releasing it and torchrun binding it), free on every interface."""

from __future__ import annotations

import socket

from helpers import ephemeral_ports, free_port


def test_free_port_is_below_the_ephemeral_range_and_bindable():
    lo, hi = ephemeral_ports()
    assert 1024 <= lo <= hi
    ports = [free_port() for _ in range(20)]
    assert all(1024 <= p < lo for p in ports), (ports, lo)
    assert len(set(ports)) > 1  # drawn, not one fixed port
    with socket.socket() as s:
        s.bind(("", ports[-1]))
