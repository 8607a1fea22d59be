"""One live launch per run directory: the launcher's lock on the train config's ``out_dir``.

The run directory is the config's ``out_dir`` (``out_dir=`` override included), the same for every launch of that
config: a relaunch after a preemption or a crash finds its checkpoints there (``-- train ... --resume``), as a
torchrun job's rdzv id or a Megatron ``--save``/``--load`` directory is reused across restarts. The launch's own id
(``argv.new_run_id``) stays per launch: it names the hosts' --env files and the c10d rendezvous only. Two launches of
one config in one work directory therefore share a run directory; before, the second one started every host and only
its rank 0 then found the directory locked (``train/run_dir.RunLock``), or, launched while the first was between
attempts, both wrote into it. Now the second is refused in one line before any host starts.

The lock is ``OUT_DIR/.meshwright.launch.lock``, created atomically (``O_EXCL``), holding the owner's host, pid, the
pid's start time (a reused pid is not the owner) and the launch id, and ``flock``-ed for the launch's life: the kernel
(or the NFS lock manager) drops that lock when the launch dies, kill -9 included, so a file left behind is recognised
as stale and taken over; where ``flock`` is unsupported, a holder on this host whose pid is gone is stale, and one on
another host is named with the file to remove. Only its owner removes it (same inode, same record), and of the
directories it created for it only the ones left empty.

Only a launch whose hosts run in its own directory takes it (commands/launch.py): with another ``--workdir`` the config
and its ``out_dir`` are the hosts', on a file system this host may not see, so the run directory is unknown here; the
launch says so in one note line, and each attempt's rank 0 still refuses a directory a live run holds
(``train/run_dir.RunLock``), after the hosts start -- except in the gap between two attempts of an elastic restart,
where nothing holds it (docs/launch.md, Run directory).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from meshwright.errors import invalid

LAUNCH_LOCK = ".meshwright.launch.lock"
RUN_LOCK = ".meshwright.lock"  # the training run's own (train/run_dir.RunLock), held by its rank 0
FRESH_S = 5.0  # a lock file this young without a record is still being written by its creator
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)  # a file system without flock


def _start_time(pid: int) -> str | None:
    """The start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22), None if it is not running (or
    no /proc): with the pid, it names one process, not whatever reuses its pid later."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _record(run_id: str) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _start_time(os.getpid()), "run_id": run_id,
            "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    try:
        rec = json.loads(os.read(fd, 4096).decode("utf-8"))
    except (ValueError, UnicodeDecodeError):
        return {}
    return rec if isinstance(rec, dict) else {}


def _holder(rec: dict[str, Any]) -> str:
    if not rec:
        return "a launch whose record is unreadable"
    return f"launch {rec.get('run_id')} (host {rec.get('host')}, pid {rec.get('pid')}, since {rec.get('since')})"


def _alive_here(rec: dict[str, Any]) -> bool | None:
    """Whether the holder still runs, where this host can tell (the holder is on this host), else None."""
    if rec.get("host") != socket.gethostname() or not isinstance(rec.get("pid"), int):
        return None
    start = _start_time(rec["pid"])
    return start is not None and (rec.get("start") is None or start == rec.get("start"))


def _try_flock(fd: int) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no flock."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EACCES):
            return False
        if exc.errno in NO_FLOCK:
            return None
        raise


@dataclass
class LaunchLock:
    """The launch's hold on ``out_dir``; ``release()`` (idempotent) gives it up."""

    path: Path
    fd: int
    record: dict[str, Any]
    created: list[Path] = field(default_factory=list)  # directories made for the lock, deepest first
    took_over: dict[str, Any] | None = None  # the stale holder's record, if this launch replaced one

    def release(self) -> None:
        if self.fd < 0:
            return
        try:
            mine = _read(self.fd) == self.record
            with contextlib.suppress(OSError):
                if mine and os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    self.path.unlink()  # only our own file: a successor's (same path, new inode) stays
        finally:
            os.close(self.fd)  # drops the flock after the unlink: a waiter then finds no file and creates its own
            self.fd = -1
        _remove_empty(self.created)

    def __enter__(self) -> "LaunchLock":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _refuse(out_dir: Path, why: str) -> Exception:
    return invalid("out_dir", str(out_dir), f"a run directory no other launch or run is using ({why}); wait for it, "
                   f"resume it once it has ended (-- train ... --resume), or set another out_dir=")


def _flock_new(fd: int) -> bool:
    """flock a file this launch just created (True; also where there is no flock). A prober that opened it before our
    flock holds it only until it reads the empty record of a fresh file (``FRESH_S``) and lets go: wait for that, a
    few seconds at most (False: still held)."""
    deadline = time.monotonic() + FRESH_S
    while _try_flock(fd) is False:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _check_no_run_training(out: Path) -> None:
    """A run already training in ``out`` (its rank 0 holds ``RUN_LOCK``: a plain `meshwright train`, or a launch with
    another work directory) is refused here too. The file is only opened if it exists; nothing is created or kept."""
    try:
        fd = os.open(out / RUN_LOCK, os.O_RDWR)  # writable: NFS emulates flock with fcntl locks, which need it
    except OSError:
        return
    try:
        if _try_flock(fd) is False:
            holder = os.read(fd, 64).decode("utf-8", "replace").strip() or "unknown"
            raise _refuse(out, f"a run is training in it, pid {holder}")
    finally:
        os.close(fd)  # our probe's flock, if it took one, goes with it


def acquire_launch_lock(out_dir: str | Path, run_id: str) -> LaunchLock:
    """Lock ``out_dir`` for this launch or refuse in one line (see the module docstring)."""
    from meshwright.train.run_dir import dirs_to_create

    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise invalid("out_dir", str(out), "a directory (this path is a file)")
    created = dirs_to_create(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise invalid("out_dir", str(out), f"a directory the launch can create ({exc.strerror or exc})") from None
    path, record = out / LAUNCH_LOCK, _record(run_id)
    try:
        _check_no_run_training(out)
        for _ in range(40):  # a holder releasing (unlinking) or creating while we look: try again
            try:
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                pass
            else:
                if not _flock_new(fd):  # ours (just created): only a prober, who lets go, can hold it for a moment
                    path.unlink()
                    os.close(fd)
                    raise _refuse(out, f"another process kept {path}, which this launch had just created, locked")
                _write(fd, record)
                return LaunchLock(path, fd, record, created)
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:
                continue
            got, old = _try_flock(fd), _read(fd)
            if got and not old and time.time() - os.fstat(fd).st_mtime < FRESH_S:
                os.close(fd)  # no record yet: its creator is between its O_EXCL open and its write; let it finish
                time.sleep(0.2)
                continue
            alive = True if got is False else False if got else _alive_here(old)  # no flock: ask /proc, if here
            if alive is not False:
                os.close(fd)
                hint = f"; if it has ended (its host cannot be asked from here), remove {path}" if alive is None else ""
                raise _refuse(out, f"it is locked by {_holder(old)}{hint}")
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # released and removed while we took the flock: start over
                os.close(fd)
                continue
            _write(fd, record)  # stale: its holder is gone (its flock dropped with it); the file becomes ours
            return LaunchLock(path, fd, record, created, took_over=old)
        raise _refuse(out, f"{path} kept changing while this launch tried to lock it")
    except BaseException:
        _remove_empty(created)
        raise


def _remove_empty(created: list[Path]) -> None:
    """Remove the directories this launch made (deepest first) while they are empty. The deepest may still hold the
    run's own lock file alone (its rank 0 made it there and, the directory not being its own, left it when it refused
    its input, train/run_dir.remove_unused): no longer held, it goes too, as the run itself would have removed it."""
    for i, d in enumerate(created):
        try:
            if i == 0 and [p.name for p in d.iterdir()] == [RUN_LOCK]:
                fd = os.open(d / RUN_LOCK, os.O_RDWR)
                try:
                    if _try_flock(fd):
                        (d / RUN_LOCK).unlink()
                finally:
                    os.close(fd)
            d.rmdir()
        except OSError:
            return


def _write(fd: int, record: dict[str, Any]) -> None:
    os.lseek(fd, 0, os.SEEK_SET)
    os.ftruncate(fd, 0)
    os.write(fd, (json.dumps(record) + "\n").encode())
    os.fsync(fd)
