"""Test helpers shared by unit, distributed and end-to-end tests."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(script: str | Path, nproc: int, args: list[str] | None = None, timeout: float = 240,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Launch ``script`` under torchrun with gloo-friendly settings; fail loudly with the ranks' output.

    Every launch costs ~10 s of startup: group many checks into one script.
    """
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           f"--master-port={free_port()}", str(script), *(args or [])]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("TORCHELASTIC_RUN_ID", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"torchrun {script} failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-6000:]}")
    return proc


def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc): torchrun's ranks, which run in sessions of their own, so a
    test that started them kills them by pid."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return sorted(out)


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def held_background_writes(timeout: float) -> tuple[threading.Event, Callable[..., Any]]:
    """A stand-in for DCP's ``_FileSystemWriter.write_data`` that, off the main thread (ckpt_async's background
    writer), first waits for the returned event (at most ``timeout`` s): a test holds a background checkpoint back
    over later steps, then sets the event. Patch it in with ``monkeypatch.setattr(_FileSystemWriter, "write_data", w)``."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    release = threading.Event()
    write = _FileSystemWriter.write_data

    def held_write(self: Any, plan: Any, planner: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # only the background writer is held
            release.wait(timeout)
        return write(self, plan, planner)

    return release, held_write


def hold_checkpoint_write(step: int, where: Path, marker: str = "held") -> None:
    """Make ckpt_async's background writer of checkpoint ``step`` touch ``where/marker`` and wait (at most 120 s)
    until ``where/release`` exists: a save is in flight exactly when a test signals (the CLI workers of
    test_fault_injection.py and test_interrupt_torchrun.py)."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    write = _FileSystemWriter.write_data
    tmp_name = f"step_{step:06d}.tmp"

    def held_write(self, plan, planner):
        if threading.current_thread() is not threading.main_thread() and Path(str(self.path)).name == tmp_name:
            (where / marker).touch()
            deadline = time.monotonic() + 120
            while not (where / "release").exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return write(self, plan, planner)

    _FileSystemWriter.write_data = held_write
