"""One live launch per run directory (launcher/launch_lock.py, commands/launch.py).

The run directory is the train config's out_dir, the same for every launch of that config (a relaunch resumes there);
the launch's own id stays per launch. Checked: the lock's record and atomic creation, a second launch (here or in
another process) refused in one line before any host starts, a run already training there refused, a stale lock (its
holder dead) taken over, a holder only this host could ask about, release removing only the launch's own file and the
directories it created while empty, and the CLI holding the lock exactly while the hosts run."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import meshwright.launcher.launch_lock as launch_lock
from meshwright.cli import main
from meshwright.errors import ConfigError
from meshwright.launcher.launch_lock import LAUNCH_LOCK, acquire_launch_lock
from meshwright.train.run_dir import RunLock

REPO = Path(__file__).resolve().parents[2]


def _holder_process(out: Path) -> subprocess.Popen:
    """Another process holding ``out``'s launch lock until its stdin closes."""
    code = textwrap.dedent(f"""
        import sys
        from meshwright.launcher.launch_lock import acquire_launch_lock
        lock = acquire_launch_lock({str(out)!r}, "meshwright-0123456789ab")
        print("held", flush=True)
        sys.stdin.read()
        lock.release()
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_the_lock_is_created_with_its_holder_and_released_with_the_directories_it_made(tmp_path):
    out = tmp_path / "runs" / "a"
    lock = acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    rec = json.loads((out / LAUNCH_LOCK).read_text())
    assert rec["host"] == socket.gethostname() and rec["pid"] == os.getpid() and rec["run_id"] == "meshwright-aaaaaaaaaaaa"
    assert rec["start"] == launch_lock._start_time(os.getpid()) is not None
    lock.release()
    lock.release()  # idempotent
    assert not (tmp_path / "runs").exists()  # both directories were made for it and are empty again
    with acquire_launch_lock(out, "meshwright-bbbbbbbbbbbb"):
        (out / "log.jsonl").write_text("{}\n")  # the run wrote into it: kept
    assert sorted(p.name for p in out.iterdir()) == ["log.jsonl"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("x")
    with acquire_launch_lock(mine, "meshwright-cccccccccccc"):
        pass
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # not created by the launch: never removed


def test_a_second_launch_is_refused_in_one_line_and_the_first_ones_lock_is_left_alone(tmp_path):
    out = tmp_path / "run"
    proc = _holder_process(out)
    try:
        before = (out / LAUNCH_LOCK).read_text()
        with pytest.raises(ConfigError) as err:
            acquire_launch_lock(out, "meshwright-bbbbbbbbbbbb")
        msg = str(err.value)
        assert msg.startswith(f"out_dir={str(out)!r} is invalid; valid: a run directory no other launch or run is "
                              f"using (it is locked by launch meshwright-0123456789ab (host {socket.gethostname()}, "
                              f"pid {proc.pid}, since ") and "\n" not in msg and "--resume" in msg
        assert (out / LAUNCH_LOCK).read_text() == before
        with pytest.raises(ConfigError, match="locked by launch meshwright-0123456789ab"):  # in this process too
            acquire_launch_lock(out, "meshwright-cccccccccccc")
    finally:
        proc.stdin.close()
        assert proc.wait(timeout=60) == 0
    assert not out.exists()  # the holder made it, and removed it: nothing of ours left behind either
    with acquire_launch_lock(out, "meshwright-dddddddddddd"):  # free again
        pass


def test_a_run_training_in_the_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with RunLock(out):
        with pytest.raises(ConfigError, match=rf"\(a run is training in it, pid {os.getpid()}\)"):
            acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    assert not (out / LAUNCH_LOCK).exists()
    with acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa"):  # the run's lock file alone (it ended) does not block
        pass


def test_a_stale_lock_is_taken_over_and_a_successors_file_is_never_removed(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "start": "1", "run_id": "meshwright-old",
             "since": "2026-01-01T00:00:00Z"}
    (out / LAUNCH_LOCK).write_text(json.dumps(stale) + "\n")  # left by a launch killed with -9: no flock held
    lock = acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    assert lock.took_over == stale and json.loads((out / LAUNCH_LOCK).read_text())["run_id"] == "meshwright-aaaaaaaaaaaa"
    # someone removed our file and a successor created its own: ours goes, theirs stays
    (out / LAUNCH_LOCK).unlink()
    (out / LAUNCH_LOCK).write_text('{"run_id": "successor"}\n')
    lock.release()
    assert (out / LAUNCH_LOCK).read_text() == '{"run_id": "successor"}\n'


def test_without_flock_a_holder_is_judged_by_its_pid_here_and_named_with_the_file_elsewhere(tmp_path, monkeypatch):
    monkeypatch.setattr(launch_lock, "_try_flock", lambda fd: None)  # a file system without flock
    out = tmp_path / "run"
    out.mkdir()
    path = out / LAUNCH_LOCK
    me = {"host": socket.gethostname(), "pid": os.getpid(), "start": launch_lock._start_time(os.getpid()),
          "run_id": "meshwright-live", "since": "t"}
    path.write_text(json.dumps(me))
    with pytest.raises(ConfigError, match=r"locked by launch meshwright-live .*\); wait for it"):
        acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    path.write_text(json.dumps({**me, "host": "elsewhere.example"}))
    with pytest.raises(ConfigError, match=rf"host elsewhere.example.*; if it has ended .*, remove {path}\)"):
        acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    path.write_text(json.dumps({**me, "start": "0"}))  # this pid, another start: a reused pid, its launch gone
    with acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa") as lock:
        assert lock.took_over["run_id"] == "meshwright-live"
    assert not path.exists()


def _config(tmp_path: Path) -> Path:
    cfg = tmp_path / "run.yaml"
    cfg.write_text("model: tiny\ndata: {path: default}\nout_dir: runs/r1\n")
    (tmp_path / "hostfile").write_text("a slots=1\n")
    return cfg


def test_launch_holds_the_configs_run_directory_while_the_hosts_run_and_refuses_a_second(tmp_path, monkeypatch,
                                                                                         capsys):
    import meshwright.launcher.remote.ssh as ssh

    cfg = _config(tmp_path)
    seen = []

    def fake_run_over_ssh(spec, *a, **kw):
        rec = json.loads((tmp_path / "runs" / "r1" / LAUNCH_LOCK).read_text())
        seen.append((spec.run_id, rec["run_id"]))
        return []

    monkeypatch.setattr(ssh, "run_over_ssh", fake_run_over_ssh)
    monkeypatch.chdir(tmp_path)
    argv = ["launch", "--hosts", "hostfile", "--", "train", str(cfg)]
    assert main(argv) == 0
    assert main(argv + ["--resume"]) == 0  # a relaunch: the same run directory, another launch id
    assert [a == b for a, b in seen] == [True, True] and seen[0][0] != seen[1][0]
    assert not (tmp_path / "runs").exists()  # made for the lock, left empty by the fake hosts: removed
    proc = _holder_process(tmp_path / "runs" / "r1")
    try:
        capsys.readouterr()
        assert main(argv + ["--resume"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "out_dir='runs/r1' is invalid" in err[0] and "meshwright-0123456789ab" in err[0]
        assert len(seen) == 2  # no host started
        assert main(argv + ["out_dir=runs/r2"]) == 0  # another run directory: free
        capsys.readouterr()
        assert main(["launch", "--hosts", "hostfile", "--workdir", "/elsewhere", "--", "train", str(cfg)]) == 0
        assert len(seen) == 4  # the hosts' config is not read here: no lock (their rank 0 still holds RunLock)
        notes = capsys.readouterr().err.strip().splitlines()  # ... and the launch says so, in one line
        assert len(notes) == 1 and notes[0].startswith("meshwright launch: note: the hosts run in --workdir "
                                                       "'/elsewhere', not this directory") and "no launch lock" in notes[0]
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_directory_the_launch_made_goes_with_the_runs_unheld_lock_file_alone(tmp_path):
    """A run that refused its input in a directory the launch made leaves its own lock file there (the directory was
    not its own to remove): the launch removes both, as the run would have. Held, or beside anything else, it stays."""
    out = tmp_path / "run"
    with acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa"):
        RunLock(out).acquire().release()  # rank 0: took the run's lock, refused, released
    assert not out.exists()
    with acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa") as lock:
        held = RunLock(out).acquire()  # a run (its ranks orphaned, say) still holds it
        lock.release()
    assert sorted(p.name for p in out.iterdir()) == [".meshwright.lock"]
    held.release()


def test_a_lock_file_being_created_is_not_taken_for_a_stale_one(tmp_path, monkeypatch):
    """A fresh file with no record yet is its creator's, between its O_EXCL open and its write: a second launch waits
    for the record instead of taking the file over (it then finds it held); an old empty one is stale."""
    out = tmp_path / "run"
    out.mkdir()
    path = out / LAUNCH_LOCK
    path.write_text("")  # a creator's file before its flock and record
    creator = {}

    def sleep(s: float) -> None:  # the creator finishes while the second launch waits
        if not creator:
            creator["lock"] = launch_lock.LaunchLock(path, os.open(path, os.O_RDWR), {"run_id": "meshwright-creator"})
            launch_lock._try_flock(creator["lock"].fd)
            launch_lock._write(creator["lock"].fd, creator["lock"].record)

    monkeypatch.setattr(launch_lock.time, "sleep", sleep)
    with pytest.raises(ConfigError, match="locked by launch meshwright-creator"):
        acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa")
    creator["lock"].release()
    assert not path.exists()
    path.write_text("")
    os.utime(path, (0, 0))  # empty and old: its creator died before writing
    with acquire_launch_lock(out, "meshwright-aaaaaaaaaaaa") as lock:
        assert lock.took_over == {}
