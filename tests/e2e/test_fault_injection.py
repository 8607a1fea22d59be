"""Fault injection: kill -9 at named points (a step, mid checkpoint write, after the `latest` update, mid
pruning, mid log rewrite, in a background checkpoint write) and at a random moment; the resumed run must replay
the uninterrupted loss trajectory bit for bit and lose nothing. Also two live runs on one out_dir, and a full disk (a small tmpfs,
root only). The killed runs are subprocesses; resumes run in this process (no second torch import).

Kill points are drawn from MESHWRIGHT_FAULT_SEED (default 19) so a failure can be replayed."""

from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshwright.config import load_train_config
from meshwright.data.corpus import stdlib_files
from meshwright.data.prepare import prepare
from meshwright.errors import ConfigError
from meshwright.train.build import run_training
from meshwright.train.checkpoint import latest_checkpoint
from meshwright.train.checkpoint_io import verify_manifest
from patience import Patience, communicate, wait

REPO = Path(__file__).resolve().parents[2]
MICRO = {"name": "micro", "arch": "llama", "vocab_size": 256, "d_model": 64, "n_layers": 2, "n_heads": 4,
         "n_kv_heads": 2, "ffn_hidden": 128, "max_seq_len": 64}
STEPS = 8
SEED = int(os.environ.get("MESHWRIGHT_FAULT_SEED", "19"))
RNG = random.Random(SEED)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return prepare(stdlib_files(30), tmp_path_factory.mktemp("data") / "corpus", progress=False)


def config(data: Path, out: Path, **overrides) -> dict:
    return {"model": MICRO, "data": {"path": str(data)}, "seq_len": 32, "global_batch": 8, "micro_batch": 4,
            "steps": STEPS, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_every": 4, "eval_batches": 1,
            "log_every": 1, "ckpt_every": 2, "keep_checkpoints": 2, "out_dir": str(out), "progress": False,
            "energy": False, **overrides}


def train_in_process(data: Path, out: Path, resume: bool, **overrides) -> dict:
    return run_training(load_train_config(config(data, out, **overrides)), resume=resume)


def spawn(data: Path, out: Path, fault: str | None, resume: bool = False, **overrides) -> subprocess.Popen:
    cfg_file = out.parent / f"{out.name}-cfg.json"
    cfg_file.write_text(json.dumps(config(data, out, **overrides)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MESHWRIGHT_FAULT", None)
    if fault:
        env["MESHWRIGHT_FAULT"] = fault
    cmd = [sys.executable, "-m", "meshwright.cli", "train", str(cfg_file), *(["--resume"] if resume else [])]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def killed(proc: subprocess.Popen, timeout: float = 180) -> None:
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == -signal.SIGKILL, f"expected a SIGKILL, got {proc.returncode}: {err[-2000:]}"


def trajectory(out: Path) -> dict[int, tuple]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in recs]
    assert steps == sorted(set(steps)), f"log.jsonl has duplicated or unordered steps: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"], r["lr"], r.get("eval_loss")) for r in recs}


def assert_nothing_lost(out: Path, reference: dict) -> None:
    assert trajectory(out) == reference  # bitwise: the floats compare exactly
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == STEPS
    ckpt = latest_checkpoint(out / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{STEPS:06d}"
    verify_manifest(ckpt)
    assert not list((out / "ckpt").glob("*.tmp")) and not list(out.glob("*.tmp"))


@pytest.fixture(scope="module")
def reference(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    train_in_process(data, out, resume=False)
    return trajectory(out)


# (site, N): the N-th arrival at site is killed. Steps 1..8; checkpoints at 2, 4, 6 (+8 at the end);
# keep_checkpoints=2 prunes first when step 6 is saved.
SCENARIOS = [
    ("step", RNG.randint(1, STEPS - 1)),
    ("ckpt_write", RNG.randint(1, 3)),
    ("ckpt_pointer", RNG.randint(1, 3)),
    ("prune", 1),
]


@pytest.mark.timeout(400)
@pytest.mark.parametrize("site,nth", SCENARIOS, ids=[f"{s}-{n}" for s, n in SCENARIOS])
def test_kill_at_a_fault_point_then_resume_is_bitwise_identical(data, reference, tmp_path, site, nth):
    out = tmp_path / "run"
    killed(spawn(data, out, f"{site}:{nth}"))
    had_checkpoint = latest_checkpoint(out / "ckpt") is not None  # else the resume starts over, as it should
    summary = train_in_process(data, out, resume=True)
    assert summary["resumed"] == had_checkpoint
    assert_nothing_lost(out, reference)


@pytest.mark.timeout(400)
def test_kill_during_a_background_checkpoint_write_then_resume_is_bitwise_identical(data, reference, tmp_path):
    """ckpt_async: the kill lands in the background writer of the step-4 checkpoint (after every file of it was
    written, before checksums and rename) while training goes on. Only its .tmp is left, `latest` still names step 2,
    and the resume (with ckpt_async again) replays the synchronous reference bit for bit."""
    out = tmp_path / "run"
    killed(spawn(data, out, "ckpt_write:2", ckpt_async=True))
    assert latest_checkpoint(out / "ckpt").name == "step_000002"
    assert (out / "ckpt" / "step_000004.tmp").is_dir() and not (out / "ckpt" / "step_000004").exists()
    summary = train_in_process(data, out, resume=True, ckpt_async=True)
    assert summary["resumed"]
    assert_nothing_lost(out, reference)


@pytest.mark.timeout(400)
def test_kill_during_the_resume_log_rewrite(data, reference, tmp_path):
    out = tmp_path / "run"
    killed(spawn(data, out, "step:5"))
    before = (out / "log.jsonl").read_text()
    killed(spawn(data, out, "log_rewrite:1", resume=True))
    assert (out / "log.jsonl").read_text() == before  # the old log, whole: the rewrite went to a .tmp
    train_in_process(data, out, resume=True)
    assert_nothing_lost(out, reference)


@pytest.mark.timeout(400)
def test_kill_at_a_random_moment(data, reference, tmp_path):
    out = tmp_path / "run"
    proc = spawn(data, out, None, ckpt_every=1, steps=STEPS)
    patience = Patience(120)
    while not (out / "log.jsonl").is_file() or not (out / "log.jsonl").read_text():
        assert proc.poll() is None and not patience.expired(), "run ended before the first step was logged"
        time.sleep(0.02)
    time.sleep(RNG.uniform(0.0, 0.6))  # somewhere in steps, checkpoint writes, pruning
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    train_in_process(data, out, resume=True, ckpt_every=1)
    ref = tmp_path / "ref"
    train_in_process(data, ref, resume=False, ckpt_every=1)  # ckpt_every does not change the trajectory,
    assert trajectory(ref) == reference  # ... which this checks, so the comparison below is with the same run
    assert_nothing_lost(out, reference)


@pytest.mark.timeout(300)
def test_two_live_runs_on_one_out_dir(data, tmp_path):
    out = tmp_path / "run"
    first = spawn(data, out, None, steps=2000, ckpt_every=0, eval_every=0)
    try:
        patience = Patience(120)
        while not (out / "log.jsonl").is_file():
            assert first.poll() is None and not patience.expired()
            time.sleep(0.05)
        with pytest.raises(ConfigError) as err:
            train_in_process(data, out, resume=False)
        assert "locked" in str(err.value) and str(first.pid) in str(err.value) and "\n" not in str(err.value)
        with pytest.raises(ConfigError, match="locked"):
            train_in_process(data, out, resume=True)
    finally:
        first.kill()
        first.communicate(timeout=60)
    assert first.returncode == -signal.SIGKILL  # it was still running: the second run never touched its files


@pytest.mark.timeout(300)
@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a small tmpfs needs root")
def test_disk_full_is_one_line_and_keeps_the_last_checkpoint(data, tmp_path):
    probe = tmp_path / "probe"
    train_in_process(data, probe, resume=False, steps=2)
    ckpt_bytes = sum(f.stat().st_size for f in (probe / "ckpt" / "step_000002").iterdir())
    mnt = tmp_path / "small"
    mnt.mkdir()
    size = int(ckpt_bytes * 1.6) + 64 * 1024  # room for one checkpoint and the log, not for two
    if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("tmpfs mount refused (no CAP_SYS_ADMIN in this container)")
    try:
        out = mnt / "run"
        with pytest.raises(ConfigError) as err:
            train_in_process(data, out, resume=False, keep_checkpoints=3)
        assert "no space left on device" in str(err.value) and "\n" not in str(err.value)
        assert not list((out / "ckpt").glob("*.tmp"))  # the partial checkpoint was removed
        last = latest_checkpoint(out / "ckpt")
        assert last is not None
        verify_manifest(last)  # what was written before the disk filled is intact
    finally:
        subprocess.run(["umount", str(mnt)])


@pytest.mark.timeout(400)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_scheduler_signal_stops_at_a_step_with_a_checkpoint_and_the_resume_loses_nothing(data, tmp_path, signum):
    """Preemption (train/preemption.py): without any periodic checkpoint, SIGTERM/SIGUSR1 mid-run stops the run at
    the next step boundary with a checkpoint there and exit 143; the resume replays the uninterrupted trajectory.
    Before, the signal killed the process and every step was lost."""
    steps = 60  # long enough for the signal to land mid-run
    out = tmp_path / "run"
    proc = spawn(data, out, None, ckpt_every=0, steps=steps)
    patience = Patience(120)
    while not (out / "log.jsonl").is_file() or len((out / "log.jsonl").read_text().splitlines()) < 2:
        assert proc.poll() is None and not patience.expired(), "run ended before its second step was logged"
        time.sleep(0.02)
    proc.send_signal(signum)
    stdout, err = communicate(proc, 120)
    assert proc.returncode == 143, (proc.returncode, err[-2000:])
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by"] == signal.Signals(signum).name and 2 <= stopped < steps
    assert f"stopped at step {stopped} of {steps}" in stdout
    assert re.search(r"checkpoint saved \(\d+\.\d s after the signal; preempt_grace_s must cover that\)", stdout), stdout
    ckpt = latest_checkpoint(out / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}"
    verify_manifest(ckpt)
    assert max(trajectory(out)) == stopped  # the log ends where the checkpoint is
    resumed = train_in_process(data, out, resume=True, ckpt_every=0, steps=steps)
    assert resumed["resumed"] and resumed["steps"] == steps and resumed["stopped_by"] is None
    ref = tmp_path / "ref"
    train_in_process(data, ref, resume=False, ckpt_every=0, steps=steps)
    assert trajectory(out) == trajectory(ref)  # bitwise


@pytest.mark.timeout(300)
def test_a_hang_up_stops_at_a_step_with_a_checkpoint_not_a_crash_on_the_dead_terminal(data, tmp_path):
    """A dropped SSH connection: the run's terminal (a pty it controls, as a login session's) hangs up. SIGHUP is in
    preempt_signals by default, so the run stops at the next step boundary with a checkpoint there, exit 143, and
    the lines it prints after the hang-up (which fail with EIO on a hung-up terminal) go nowhere instead of ending
    it with an OSError. Before, SIGHUP killed it at once, a checkpoint being written with it."""
    import fcntl
    import pty
    import select
    import termios

    steps = 60
    out = tmp_path / "run"
    cfg_file = tmp_path / "run-cfg.json"
    cfg_file.write_text(json.dumps(config(data, out, ckpt_every=0, steps=steps, eval_every=0)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("MESHWRIGHT_FAULT", None)
    master, slave = pty.openpty()

    def own_terminal() -> None:  # a new session whose controlling terminal is the pty, as sshd sets one up
        os.setsid()
        fcntl.ioctl(0, termios.TIOCSCTTY, 0)

    proc = subprocess.Popen([sys.executable, "-m", "meshwright.cli", "train", str(cfg_file)], stdin=slave,
                            stdout=slave, stderr=slave, env=env, cwd=REPO, preexec_fn=own_terminal)
    os.close(slave)
    seen = b""
    try:
        patience = Patience(120)
        while not (out / "log.jsonl").is_file() or len((out / "log.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and not patience.expired(), seen[-2000:]
            if select.select([master], [], [], 0.02)[0]:
                seen += os.read(master, 65536)  # what a terminal shows; read so the run never blocks on it
        os.close(master)  # sshd closing the pty's master: the kernel hangs up the terminal and sends SIGHUP
        master = -1
        assert wait(proc, 120) == 143, (proc.returncode, seen[-2000:])
    finally:
        if master >= 0:
            os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by"] == "SIGHUP" and 2 <= stopped < steps
    ckpt = latest_checkpoint(out / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}"
    verify_manifest(ckpt)
    assert max(trajectory(out)) == stopped  # the log ends where the checkpoint is


def spawn_held(data: Path, out: Path, hold_step: int, **overrides) -> tuple[subprocess.Popen, Path, Path]:
    """``spawn`` through held_write_train.py: ckpt_async's write of checkpoint ``hold_step`` held until the test
    creates out/../held/release. Output goes to files (unbuffered) the test reads while the run lives."""
    held = out.parent / "held"
    held.mkdir()
    cfg_file = out.parent / f"{out.name}-cfg.json"
    cfg_file.write_text(json.dumps(config(data, out, ckpt_async=True, **overrides)))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "MESHWRIGHT_TEST_HOLD": f"{hold_step}:{held}"}
    env.pop("MESHWRIGHT_FAULT", None)
    stdout = out.parent / "stdout.txt"
    with open(stdout, "w") as fo, open(out.parent / "stderr.txt", "w") as fe:
        proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "e2e" / "held_write_train.py"), str(cfg_file)],
                                env=env, cwd=REPO, stdout=fo, stderr=fe)
    return proc, held, stdout


def main_thread_waits(proc: subprocess.Popen, log: Path, step: int, quiet_s: float = 1.0) -> bool:
    """Whether the run logged ``step`` and its main thread has slept (blocked) for ``quiet_s`` since: it waits for
    something (here the held checkpoint), read from /proc, which the run does not know about."""
    if not log.is_file() or f'"step": {step},' not in log.read_text():
        return False
    end = time.monotonic() + quiet_s
    while time.monotonic() < end:
        if Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
            return False
        time.sleep(0.02)
    return True


def wait_until(proc: subprocess.Popen, ready, what: str, timeout: float = 120) -> None:
    patience = Patience(timeout)
    while not ready():
        if proc.poll() is not None or patience.expired():
            proc.kill()
            err = (Path(proc.args[-1]).parent / "stderr.txt").read_text()[-2000:]
            raise AssertionError(f"{what}: not seen (rc={proc.poll()}): {err}")
        time.sleep(0.02)


@pytest.mark.timeout(400)
@pytest.mark.parametrize("second_press", [True, False], ids=["abandoned", "completed"])
def test_ctrl_c_while_a_background_checkpoint_is_waited_for(data, reference, tmp_path, second_press):
    """ckpt_async, the step-4 write held; at step 6 the trainer waits for it. Ctrl-C then is reported (one line)
    and the wait goes on. A second Ctrl-C abandons the write: exit 130 at once (the writer still held), no traceback,
    nothing of step 4 published, step 2 stays `latest`, and the resume replays the reference. Without a second one,
    the write completes when released, `latest` names step 4, then the run stops (130). Before, the first Ctrl-C
    broke the wait: the run exited while its writer still ran, and the next save or the process group teardown
    was not waited for."""
    out = tmp_path / "run"
    proc, held, stdout = spawn_held(data, out, hold_step=4)
    try:
        # step 6's save waits for step 4's held write
        wait_until(proc, lambda: (held / "held").exists() and main_thread_waits(proc, out / "log.jsonl", 6),
                   "the wait for the step-4 checkpoint")
        proc.send_signal(signal.SIGINT)
        wait_until(proc, lambda: "still finishing checkpoint step 4" in stdout.read_text(), "the first Ctrl-C's line")
        line = next(x for x in stdout.read_text().splitlines() if "still finishing" in x)
        assert "press Ctrl-C again to abandon it (step_000002 stays the latest checkpoint)" in line, line
        time.sleep(0.3)
        assert proc.poll() is None  # still waiting for the write
        if second_press:
            proc.send_signal(signal.SIGINT)
        else:
            (held / "release").touch()
        wait(proc, 60 if second_press else 120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = (tmp_path / "stderr.txt").read_text()
    assert proc.returncode == 130 and "Traceback" not in err, (proc.returncode, err[-3000:])
    assert "meshwright train: interrupted" in err
    ckpt = out / "ckpt"
    if second_press:
        assert not (held / "release").exists()  # it exited while the writer was still held
        assert "abandoned checkpoint step 4: step_000002 stays the latest checkpoint" in stdout.read_text()
        assert latest_checkpoint(ckpt).name == "step_000002" and not (ckpt / "step_000004").exists()
        verify_manifest(ckpt / "step_000002")
        summary = train_in_process(data, out, resume=True, ckpt_async=True)
        assert summary["resumed"]
        assert_nothing_lost(out, reference)
    else:
        assert latest_checkpoint(ckpt).name == "step_000004" and not list(ckpt.glob("*.tmp"))
        verify_manifest(ckpt / "step_000004")
