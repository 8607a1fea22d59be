"""Test helpers shared by unit, distributed and end-to-end tests."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

from patience import Patience

REPO = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def ephemeral_ports() -> tuple[int, int]:
    """The kernel's range for the local ends of outgoing connections (and for bind to port 0)."""
    try:
        lo, hi = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
        return lo, hi
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


def free_port() -> int:
    """A TCP port free now on every interface, for a rendezvous the caller's launch binds later. Drawn below the
    ephemeral range: the port is released before torchrun binds it, and one from that range (what binding port 0
    returns) can meanwhile become the local end of any outgoing connection on the box (gloo's, another test's);
    one below it is only taken by an explicit bind."""
    lo, _ = ephemeral_ports()
    draw = random.SystemRandom()  # not the tests' seeded generator: parallel sessions must not draw alike
    for _ in range(200):
        port = draw.randrange(max(1024, lo - 12000), lo)
        with socket.socket() as s:
            try:
                s.bind(("", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:  # a box whose low ports are all taken: the old way
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_ADDRESS_IN_USE = re.compile(r"EADDRINUSE|address already in use", re.I)


def address_in_use(output: str) -> bool:
    """Whether a launch's output says its rendezvous port was taken (TCPStore's bind: "code: -98, name:
    EADDRINUSE, message: address already in use"): free_port()'s port is released before the launch binds it,
    and another process may bind it meanwhile. A launch that says so is retried once with a new port."""
    return _ADDRESS_IN_USE.search(output) is not None


# pytest's tmp_path_factory for the session (tests/conftest.py sets it): a launch's per-rank logs go under the
# session's base temp directory, named after the test, unless the caller names a directory.
TMP_FACTORY: Any = None

_ROOT_CAUSE = re.compile(r"Root Cause \(first observed failure\):.*?rank\s*:\s*(\d+)\s*\(local_rank:\s*(\d+)\)", re.S)


def _launch_log_dir(script: str | Path) -> Path:
    """A fresh directory for one launch's per-rank logs: under pytest's session temp directory (kept after the
    session, for a failure to be read in full) named after the running test, else a system temp directory."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0].split("::")[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"torchrun-{test or Path(str(script)).stem}")[:60]
    base = TMP_FACTORY.getbasetemp() if TMP_FACTORY is not None else None
    return Path(tempfile.mkdtemp(prefix=f"{name}-", dir=base))


def rank_logs(log_dir: str | Path) -> dict[int, dict[str, str]]:
    """{local rank: {"stdout": text, "stderr": text}} from torchrun's ``--log-dir`` with ``--redirects 3``
    (``<dir>/<run id>_*/attempt_<k>/<local rank>/std{out,err}.log``; attempts of a restarted run in order)."""
    out: dict[int, dict[str, str]] = {}
    attempts = sorted(Path(log_dir).glob("*/attempt_*"), key=lambda a: (a.parent.name, int(a.name.split("_")[-1])))
    for attempt in attempts:
        ranks = sorted((d for d in attempt.iterdir() if d.is_dir() and d.name.isdigit()), key=lambda d: int(d.name))
        for rank_dir in ranks:
            logs = out.setdefault(int(rank_dir.name), {"stdout": "", "stderr": ""})
            for stream in ("stdout", "stderr"):
                f = rank_dir / f"{stream}.log"
                if f.is_file():
                    logs[stream] += f.read_text(errors="replace")
    return out


def whole_last_traceback(text: str, limit: int = 60_000) -> str:
    """``text`` if under ``limit`` characters, else its tail from the last Python traceback (whole, whatever its
    length; the tail of ``limit`` characters when there is none): what a failure report must not cut."""
    if len(text) <= limit:
        return text
    start = max(text.rfind("Traceback (most recent call last)"), text.rfind("Fatal Python error"))
    if start < 0:
        start = len(text) - limit
    start = text.rfind("\n", 0, start) + 1  # the whole line (torch prefixes "[rankN]: ")
    return f"[... {start} earlier characters in the log file ...]\n{text[start:]}"


def failed_launch_report(what: str, log_dir: Path, torchrun_out: str, torchrun_err: str) -> str:
    """The failure message of a torchrun launch: the first failing rank (torchrun's root cause, else the first
    rank with a traceback) with its stderr whole and its stdout's tail, every other rank's stderr tail, torchrun's
    own stderr tail, and where every rank's full log is."""
    logs = rank_logs(log_dir)
    m = _ROOT_CAUSE.search(torchrun_err) or _ROOT_CAUSE.search(torchrun_out)
    first = int(m.group(2)) if m else next((r for r, v in sorted(logs.items()) if "Traceback" in v["stderr"]
                                            or "(most recent call first)" in v["stderr"]), None)
    why = "torchrun's root cause" if m else "the first rank with a traceback or stack dump"
    parts = [f"{what}; every rank's full log: {log_dir}"]
    if first is not None and first in logs:
        parts += [f"===== local rank {first} ({why}): stderr, whole =====", whole_last_traceback(logs[first]["stderr"]),
                  f"===== local rank {first}: stdout, last 3000 characters =====", logs[first]["stdout"][-3000:]]
    for r, v in sorted(logs.items()):
        if r != first:
            parts += [f"===== local rank {r}: stderr, last 1500 characters =====", v["stderr"][-1500:]]
    if not logs:
        parts.append("(no rank logs: the ranks never started)")
    parts += ["===== torchrun: stdout, last 2000 characters =====", torchrun_out[-2000:],
              "===== torchrun: stderr, last 4000 characters =====", torchrun_err[-4000:]]
    return "\n".join(parts)


def ended(pid: int) -> bool:
    """Whether process ``pid`` has ended (gone, or a zombie awaiting its reaper)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_launch(proc: subprocess.Popen, dump_stacks: bool = False) -> None:
    """End torchrun's ranks (sessions of their own: torchrun's death spares them, and an orphaned rank keeps a
    loaded box busier for the tests after it), then torchrun itself; by pid. ``dump_stacks``: SIGABRT first, on
    which a rank started with PYTHONFAULTHANDLER=1 writes every thread's Python stack to its stderr (where a hung
    launch hung), waiting at most 20 s of quiet-box time (tests/patience.py) for them to end; then SIGKILL."""
    ranks = children(proc.pid)
    if dump_stacks:
        proc.send_signal(signal.SIGSTOP)  # else torchrun, seeing the first rank end, SIGTERMs the others first
    for sig in ((signal.SIGABRT, signal.SIGKILL) if dump_stacks else (signal.SIGKILL,)):
        for pid in ranks:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGABRT:  # a loaded box writes the stacks slowly: cut short, they were lost to SIGKILL
            Patience(20).until(lambda: all(ended(pid) for pid in ranks), poll=0.1)
    proc.kill()


def run_torchrun(script: str | Path, nproc: int, args: list[str] | None = None, timeout: float = 240,
                 env: dict[str, str] | None = None, log_dir: str | Path | None = None,
                 module: bool = False) -> subprocess.CompletedProcess:
    """Launch ``script`` (a module with ``module``) under torchrun with gloo-friendly settings; on failure or timeout
    raise an AssertionError with the first failing rank's stderr whole (failed_launch_report).

    Each rank writes its own stdout/stderr files (``--log-dir`` with ``--redirects 3``: no lines of two ranks joined
    into one, nothing cut) under ``log_dir`` (default: a directory named after the test under pytest's session temp
    directory), kept when the launch fails; on success the returned ``stdout``/``stderr`` are torchrun's followed
    by each rank's in rank order, and the directory is removed. ``--standalone`` binds its own rendezvous port
    (no ``--master-port``: torchrun ignores it under c10d, and a port picked and released here could be taken
    by another test before torchrun binds it). Every launch costs ~10 s of startup: group many checks into one
    script.
    """
    logs = Path(log_dir) if log_dir is not None else _launch_log_dir(script)
    logs.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", f"--log-dir={logs}",
           "--redirects=3", *(["-m"] if module else []), str(script), *(args or [])]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1",
                **(env or {})}
    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        full_env.pop(k, None)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=full_env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_launch(proc, dump_stacks=True)
        out, err = proc.communicate()
        raise AssertionError(failed_launch_report(
            f"torchrun {script} timed out after {timeout} s (ranks killed; their Python stacks, from SIGABRT, end "
            "their stderr)", logs, out, err)) from None
    except BaseException:  # KeyboardInterrupt, pytest-timeout: leave no rank behind
        kill_launch(proc)
        proc.communicate()
        raise
    if proc.returncode != 0:
        raise AssertionError(failed_launch_report(f"torchrun {script} failed (rc={proc.returncode})", logs, out, err))
    ranks = rank_logs(logs)
    stdout = out + "".join(v["stdout"] for _, v in sorted(ranks.items()))
    stderr = err + "".join(v["stderr"] for _, v in sorted(ranks.items()))
    if log_dir is None:
        shutil.rmtree(logs, ignore_errors=True)  # created here; a passing launch leaves nothing behind
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


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
    writer), first waits for the returned event (at most ``timeout`` s of quiet-box time, tests/patience.py: a
    loaded box does not release the write before the test does): a test holds a background checkpoint back
    over later steps, then sets the event. Patch it in with ``monkeypatch.setattr(_FileSystemWriter, "write_data", w)``."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    release = threading.Event()
    write = _FileSystemWriter.write_data

    def held_write(self: Any, plan: Any, planner: Any) -> Any:
        if threading.current_thread() is not threading.main_thread():  # only the background writer is held
            Patience(timeout).until(release.is_set)
        return write(self, plan, planner)

    return release, held_write


def hold_checkpoint_write(step: int, where: Path, marker: str = "held") -> None:
    """Make ckpt_async's background writer of checkpoint ``step`` touch ``where/marker`` and wait (at most 120 s of
    quiet-box time, tests/patience.py) until ``where/release`` exists: a save is in flight exactly when a test signals (the CLI workers of
    test_fault_injection.py and test_interrupt_torchrun.py)."""
    from torch.distributed.checkpoint.filesystem import _FileSystemWriter

    write = _FileSystemWriter.write_data
    tmp_name = f"step_{step:06d}.tmp"

    def held_write(self, plan, planner):
        if threading.current_thread() is not threading.main_thread() and Path(str(self.path)).name == tmp_name:
            (where / marker).touch()
            Patience(120).until((where / "release").exists, poll=0.02)
        return write(self, plan, planner)

    _FileSystemWriter.write_data = held_write
