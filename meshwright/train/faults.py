"""Named fault points for the fault-injection suite (tests/e2e/test_fault_injection.py).

Inert unless ``MESHWRIGHT_FAULT=SITE:N`` is set: then the N-th time this process reaches ``SITE`` it kills
itself with SIGKILL, exactly as an OOM killer or a lost node would, in the middle of a checkpoint write,
the ``latest`` update, pruning, the log rewrite or between steps. Reading one environment variable per
call costs nothing measurable next to the I/O around these points.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

SITES = ("step", "ckpt_write", "ckpt_pointer", "prune", "log_rewrite")
_reached: Counter[str] = Counter()


def fault_point(site: str) -> None:
    """SIGKILL this process if ``MESHWRIGHT_FAULT`` names ``site`` and this is its N-th arrival."""
    spec = os.environ.get("MESHWRIGHT_FAULT")
    if not spec:
        return
    name, _, nth = spec.partition(":")
    if name != site:
        return
    _reached[site] += 1
    if _reached[site] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)
