"""`meshwright launch` over a real local sshd (127.0.0.1 and 127.0.0.2 as two nodes)."""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import LaunchSpec
from meshwright.launcher.remote.hostfile import Host
from meshwright.launcher.remote.ssh import run_over_ssh, summarize_failure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from helpers import address_in_use, free_port  # noqa: E402
from patience import Patience, scaled, scaled_env_s  # noqa: E402
from sshd import SSHD, start_sshd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def _connect_s() -> int:
    """The SSH connect timeout: 10 s on a quiet box, stretched by its load (sshd's fork and key exchange wait for
    the CPU like everything else)."""
    return int(scaled(10))


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if SSHD is None:
        if os.environ.get("CI"):
            pytest.fail("sshd missing in CI: .ci/run must install openssh-server")
        pytest.skip("sshd not installed (apt-get install openssh-server)")
    server = start_sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def fake_python(tmp_path: Path) -> Path:
    """Stands in for the hosts' python: node 1 fails, node 0 would run for a minute."""
    script = tmp_path / "fakepython"
    script.write_text(
        "#!/bin/sh\n"
        f"case \"$*\" in *--node-rank=1*) echo 'rank 1: CUDA error: boom'; exit 3;; esac\n"
        f"echo $$ > {tmp_path}/node0.pid\n"
        "echo 'rank 0 waiting'\nsleep 60\necho 'rank 0 finished'\n"
    )
    script.chmod(0o755)
    return script


def test_one_host_failing_stops_all_hosts(sshd, tmp_path):
    spec = LaunchSpec(hosts=[Host("127.0.0.1", 1), Host("127.0.0.2", 1)], train_args=["train", "default"],
                      python=str(fake_python(tmp_path)), workdir=str(tmp_path))
    out = io.StringIO()
    results = run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(), sink=out,
                           known_hosts=str(sshd.known_hosts))
    # stopped, not run to its end (it would print that after its minute); a wall-clock bound here measured the
    # box's load as much as the stop
    assert "rank 0 finished" not in out.getvalue(), "the healthy host was not stopped after the failure"
    codes = {r.host: r.exit_code for r in results}
    assert codes["127.0.0.2"] == 3
    assert codes["127.0.0.1"] != 0
    message = summarize_failure(results)
    assert "127.0.0.2 failed with exit code 3" in message and "CUDA error: boom" in message
    assert "[127.0.0.2] rank 1: CUDA error: boom" in out.getvalue()
    pid = int((tmp_path / "node0.pid").read_text())
    for _ in range(50):  # the remote shell on node 0 got SIGHUP when its pty was closed
        if subprocess.run(["kill", "-0", str(pid)], capture_output=True).returncode != 0:
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"remote process {pid} on 127.0.0.1 still alive")


def interruptible_python(tmp_path: Path) -> Path:
    """Stands in for the hosts' python as torchrun behaves: the first Ctrl-C on its terminal starts a stop that
    waits (a checkpoint being finished), the second ends it with 130; each host records what it received."""
    script = tmp_path / "fakepython"
    script.write_text(
        "#!/bin/sh\n"
        "case \"$*\" in *--node-rank=1*) node=1;; *) node=0;; esac\n"
        f"rec={tmp_path}/node$node.txt\n"
        "n=0\n"
        "trap 'n=$((n+1)); echo \"INT $n\" >> $rec; echo \"Ctrl-C $n\"; "
        "if [ $n -ge 2 ]; then echo stopped; exit 130; fi' INT\n"
        "trap 'echo HUP >> $rec; exit 129' HUP\n"
        "echo \"node $node waiting\"\n"
        "i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
        "echo 'not interrupted'; exit 0\n"
    )
    script.chmod(0o755)
    return script


def test_ctrl_c_of_the_launch_is_passed_on_to_every_host_not_a_hang_up(sshd, tmp_path):
    """Ctrl-C of `meshwright launch` reaches each host as its own terminal's Ctrl-C would (SIGINT to torchrun, which
    stops its ranks: docs/training.md, "Interrupting a run"), and the launch waits for them; a second Ctrl-C is
    passed on too, then the launch ends interrupted. Before, the first one hung up on the hosts: SIGHUP, the ranks
    died at once with any checkpoint being written."""
    import signal
    import threading

    spec = LaunchSpec(hosts=[Host("127.0.0.1", 1), Host("127.0.0.2", 1)], train_args=["train", "default"],
                      python=str(interruptible_python(tmp_path)), workdir=str(tmp_path))
    out = io.StringIO()
    main = threading.get_ident()
    seen = []

    def press_twice() -> None:
        def wait_for(text: str, count: int) -> None:
            seen.append(Patience(60).until(lambda: out.getvalue().count(text) >= count))

        wait_for(" waiting", 2)
        signal.pthread_kill(main, signal.SIGINT)
        wait_for("Ctrl-C 1", 2)
        time.sleep(0.5)
        seen.append("stopped" not in out.getvalue() and not launch_done.is_set())  # waiting for the second press
        if not launch_done.is_set():  # (a launch that ended at the first press fails the test, not the session)
            signal.pthread_kill(main, signal.SIGINT)

    launch_done = threading.Event()
    presser = threading.Thread(target=press_twice)
    presser.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            try:
                run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(), sink=out,
                             known_hosts=str(sshd.known_hosts))
            finally:
                launch_done.set()
    finally:
        presser.join(90)
    text = out.getvalue()
    assert seen == [True, True, True], text
    for node, host in enumerate(("127.0.0.1", "127.0.0.2")):
        assert (tmp_path / f"node{node}.txt").read_text() == "INT 1\nINT 2\n", text  # no SIGHUP
        assert f"[{host}] stopped" in text, text
    assert text.count("meshwright launch: Ctrl-C passed on to the torchrun of every host still running") == 2


def test_unknown_or_changed_host_key_is_refused_in_one_line(sshd, tmp_path):
    """The sshd's key is not in an empty known_hosts, or another key is recorded for it: nothing is started."""
    import paramiko

    spec = LaunchSpec(hosts=[Host("127.0.0.1", 1)], train_args=["train", "default"], python="/bin/false",
                      workdir=str(tmp_path))
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(ConfigError, match=r"^host='127.0.0.1' has no key in known_hosts") as err:
        run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(),
                     known_hosts=str(empty))
    assert "\n" not in str(err.value)
    other = paramiko.ECDSAKey.generate()
    empty.write_text(f"[127.0.0.1]:{sshd.port} {other.get_name()} {other.get_base64()}\n")
    with pytest.raises(ConfigError, match=r"^host='127.0.0.1' presented a host key that differs"):
        run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(),
                     known_hosts=str(empty))


def test_cli_launch_unreachable_host_one_line(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n")
    proc = subprocess.run([sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", "9",
                           "--connect-timeout", "3", "--", "train", "default"],
                          capture_output=True, text=True, timeout=scaled(60), cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "host='127.0.0.1' is unreachable over SSH" in lines[0]


def test_two_node_torchrun_launch_trains_tiny_dp2(sshd, tmp_path):
    """127.0.0.2 and 127.0.0.1 as two nodes, one rank each: a real dp2 run over SSH, ranks in hostfile order
    (static rendezvous): the first host, 127.0.0.2, runs global rank 0."""
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.2 slots=1\n127.0.0.1 slots=1\n")
    out_dir = tmp_path / "run"
    proc = _launch_run(lambda port: [
        sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", str(sshd.port),
        "--connect-timeout", str(_connect_s()),
        "--ssh-key", str(sshd.key), "--ssh-known-hosts", str(sshd.known_hosts), "--launcher", "torchrun",
        "--python", sys.executable, "--workdir", str(REPO),
        "--rdzv-port", str(port), "--env", "OMP_NUM_THREADS=1", "--env", f"PYTHONPATH={REPO}",
        "--", "train", "tiny-test", "steps=4", "eval_every=0", "log_every=1", "data.max_files=20", f"out_dir={out_dir}"],
        180, out_dir)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp_size"] == 2 and summary["steps"] == 4
    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) for r in recs) and recs[-1]["loss"] < recs[0]["loss"]
    # every line streamed is prefixed by its host; rank 0's lines also by (torchrun --tee) its local rank. Global rank
    # 0 (the one line of the summary) is the hostfile's first host: under c10d it was torchrun's choice, by address
    # then pid (here both "nodes" are one machine, so by pid: either)
    lines = proc.stdout.splitlines()
    assert lines and all(line.startswith(("[127.0.0.1] ", "[127.0.0.2] ")) for line in lines), proc.stdout[-6000:]
    summary_lines = [line for line in lines if "summary:" in line]
    assert len(summary_lines) == 1, proc.stdout[-6000:]
    assert summary_lines[0].startswith("[127.0.0.2] [default0]:summary:"), proc.stdout[-6000:]
    assert "node_rank is only used for static" not in proc.stdout + proc.stderr  # torchrun's c10d warning


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.timeout(500)
def test_a_dropped_connection_stops_every_rank_at_one_step_with_a_checkpoint(sshd, tmp_path):
    """The launch's connections drop (its machine vanishes: SIGKILL, so nothing is passed on). sshd hangs up each
    host's pty, torchrun passes the SIGHUP to its ranks, and they stop after the same step with a checkpoint there
    (preempt_signals), not at once, mid-save, as before. Then every rank and torchrun is gone."""
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run"
    pids = tmp_path / "torchrun.pids"
    wrapper = tmp_path / "python"  # the hosts' python: records the pid of the torchrun it becomes
    wrapper.write_text(f"#!/bin/sh\necho $$ >> {pids}\nexec {shlex.quote(sys.executable)} \"$@\"\n")
    wrapper.chmod(0o755)
    from helpers import children

    steps = 2000  # never reached
    log = tmp_path / "launch.txt"

    def start() -> subprocess.Popen:
        pids.write_text("")  # this launch's torchruns only (a relaunch on a taken port starts new ones)
        with open(log, "w") as fh:
            return subprocess.Popen(
                [sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", str(sshd.port),
                 "--connect-timeout", str(_connect_s()),
                 "--ssh-key", str(sshd.key), "--ssh-known-hosts", str(sshd.known_hosts), "--python", str(wrapper),
                 "--workdir", str(REPO), "--rdzv-port", str(free_port()), "--env", "OMP_NUM_THREADS=1",
                 "--env", f"PYTHONPATH={REPO}", *_STRETCHED_ENV,
                 "--", "train", "tiny-test", f"steps={steps}", "eval_every=0", "log_every=1", "data.max_files=20",
                 "ckpt_every=0", "progress=false", f"out_dir={out_dir}"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)

    agents: list[int] = []
    ranks: set[int] = set()
    launch: subprocess.Popen | None = None
    try:
        launch = _started(start, out_dir, log, 2)
        agents = [int(p) for p in pids.read_text().split()]
        ranks = {c for a in agents for c in children(a)}
        assert len(agents) == 2 and len(ranks) >= 2, log.read_text()[-4000:]
        launch.kill()  # the connections close with the process: nothing is passed on, sshd hangs up the ptys
        launch.wait(30)
        patience = Patience(120)  # torchrun waits 30 s (stretched alike) for its ranks, then kills them
        while any(_alive(p) for p in (*agents, *ranks)):
            ranks |= {c for a in agents if _alive(a) for c in children(a)}
            left = [p for p in (*agents, *ranks) if _alive(p)]
            assert not patience.expired(), f"still running after the hang-up ({patience.waited()}): {left}"
            time.sleep(0.2)
    finally:
        for pid in [*ranks, *agents]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if launch is not None and launch.poll() is None:
            launch.kill()
            launch.wait(10)
    summary = json.loads((out_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by"] == "SIGHUP" and summary["world_size"] == 2 and 2 <= stopped < steps
    from meshwright.train.checkpoint import latest_checkpoint
    from meshwright.train.checkpoint_io import verify_manifest

    ckpt = latest_checkpoint(out_dir / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}", summary
    verify_manifest(ckpt)
    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert recs[-1]["step"] == stopped  # the log ends where the checkpoint is


def test_two_node_deepspeed_launch_over_pdsh(sshd, tmp_path):
    """`--launcher deepspeed`: DeepSpeed's runner reaches both loopback "nodes" through pdsh + ssh."""
    if shutil.which("pdsh") is None:
        if os.environ.get("CI"):
            pytest.fail("pdsh missing in CI: .ci/run must install pdsh")
        pytest.skip("pdsh not installed (apt-get install pdsh)")
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run"
    # throw-away host key: don't record it in the user's known_hosts
    env = {**os.environ, "PDSH_SSH_ARGS_APPEND": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}
    proc = _launch_run(lambda port: [
        sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", str(sshd.port),
        "--connect-timeout", str(_connect_s()),
        "--ssh-key", str(sshd.key), "--launcher", "deepspeed", "--python", sys.executable, "--workdir", str(REPO),
        "--rdzv-port", str(port), "--env", "OMP_NUM_THREADS=1", "--env", f"PYTHONPATH={REPO}",
        "--", "train", "tiny-test", "steps=4", "eval_every=0", "log_every=1", "data.max_files=20", f"out_dir={out_dir}"],
        180, out_dir, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp_size"] == 2 and summary["steps"] == 4
    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["loss"] < recs[0]["loss"]
    both = proc.stdout + proc.stderr
    assert "127.0.0.2: " in both and "node_rank=1" in both  # the second node really ran over pdsh


# the gloo timeout and torchrun's wait for its ranks' stop before SIGKILL (30 s: preempt_grace_s is 0 here; the user's
# --env wins over the launch's own value), both stretched by the box's load like the tests' own waits
_STRETCHED_ENV = ["--env", f"MESHWRIGHT_PG_TIMEOUT_S={scaled_env_s(60)}",
                  "--env", f"TORCH_ELASTIC_SHUTDOWN_TIMEOUT={scaled_env_s(30)}"]


def _launch_run(argv, timeout: float, out_dir: Path, **kwargs) -> subprocess.CompletedProcess:
    """``argv(port)`` (a `meshwright launch` with ``--rdzv-port port``) run to its end within ``timeout`` s of a quiet
    box (stretched by the load); once more, with another port from free_port(), if its rendezvous port was taken
    between free_port() and the bind (EADDRINUSE in its output)."""
    for attempt in (1, 2):
        proc = subprocess.run(argv(free_port()), capture_output=True, text=True, timeout=scaled(timeout), cwd=REPO,
                              **kwargs)
        if proc.returncode == 0 or attempt == 2 or not address_in_use(proc.stdout + proc.stderr):
            return proc
        _wait_until_gone(out_dir)  # the failed launch's other host (no rank started: nothing was written)
    raise AssertionError("unreachable")


def _wait_for_records(records: Path, launch: subprocess.Popen, log: Path, n: int, timeout: float = 300) -> None:
    """Poll until the run has logged ``n`` steps, failing with the launch's log tail if it ends or stalls (``timeout``
    s of quiet-box time: tests/patience.py)."""
    patience = Patience(timeout)
    while not records.is_file() or len(records.read_text().splitlines()) < n:
        assert launch.poll() is None, log.read_text()[-4000:]
        assert not patience.expired(), f"{n} steps not logged after {patience.waited()}: {log.read_text()[-4000:]}"
        time.sleep(0.1)


def _started(start, out_dir: Path, log: Path, n: int) -> subprocess.Popen:
    """``start()`` (a `meshwright launch` writing ``log``, picking its ``--rdzv-port`` with free_port()) once the run
    has logged ``n`` steps; started again once if the first ended on its rendezvous port taken (EADDRINUSE)."""
    launch = start()
    try:
        _wait_for_records(out_dir / "log.jsonl", launch, log, n)
        return launch
    except BaseException as exc:
        if not isinstance(exc, AssertionError) or launch.poll() is None or not address_in_use(log.read_text()):
            _kill_leftovers(out_dir, launch)
            raise
    _kill_leftovers(out_dir, launch)  # the other host's torchrun, waiting for the rendezvous: no rank started
    launch = start()
    try:
        _wait_for_records(out_dir / "log.jsonl", launch, log, n)
    except BaseException:
        _kill_leftovers(out_dir, launch)
        raise
    return launch


def _running_with(marker: str) -> list[int]:
    """Pids whose command line holds ``marker`` (a test's own temporary out_dir): what the test started."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in found if p != os.getpid()]


def _wait_until_gone(out_dir: Path, within_s: float = 60) -> None:
    """Every process of the run writing ``out_dir`` has exited (the launch's exit does not wait for remote ranks),
    within ``within_s`` s of quiet-box time."""
    patience = Patience(within_s)
    while _running_with(f"out_dir={out_dir}"):
        assert not patience.expired(), f"still running ({patience.waited()}): {_running_with(f'out_dir={out_dir}')}"
        time.sleep(0.2)


def _kill_leftovers(out_dir: Path, launch: subprocess.Popen) -> None:
    """After a failed check: SIGKILL what the test started (its out_dir in the command line) and the launch."""
    for pid in _running_with(f"out_dir={out_dir}"):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if launch.poll() is None:
        launch.kill()
        launch.wait(10)


@pytest.mark.timeout(500)
def test_ctrl_c_of_a_deepspeed_launch_stops_every_rank_with_a_checkpoint(sshd, tmp_path):
    """`--launcher deepspeed` over pdsh, Ctrl-C to the launch: it passes it on to DeepSpeed's runner, waits for it,
    closes the ssh clients pdsh leaves, and each host's pty hangs up (ssh -tt): both ranks stop after the same step
    with a checkpoint there (SIGHUP), nothing is left running, the launch says `interrupted` (130). Before, the launch
    SIGKILLed the runner, DeepSpeed's remote pkill failed ('only one pattern can be provided') and the ranks trained
    on, orphaned."""
    if shutil.which("pdsh") is None:
        pytest.skip("pdsh not installed (apt-get install pdsh)")
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run"
    env = {**os.environ,
           "PDSH_SSH_ARGS_APPEND": "-o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null -o LogLevel=ERROR"}
    steps = 2000  # never reached
    log = tmp_path / "launch.txt"

    def start() -> subprocess.Popen:
        with open(log, "w") as fh:
            return subprocess.Popen(
                [sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", str(sshd.port),
                 "--connect-timeout", str(_connect_s()),
                 "--ssh-key", str(sshd.key), "--launcher", "deepspeed", "--python", sys.executable,
                 "--workdir", str(REPO), "--rdzv-port", str(free_port()), "--env", "OMP_NUM_THREADS=1",
                 "--env", f"PYTHONPATH={REPO}", "--env", f"MESHWRIGHT_PG_TIMEOUT_S={scaled_env_s(60)}",
                 "--", "train", "tiny-test", f"steps={steps}", "eval_every=0", "log_every=1", "data.max_files=20",
                 "ckpt_every=0", "progress=false", f"out_dir={out_dir}"],
                stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env, start_new_session=True)

    launch = _started(start, out_dir, log, 2)
    try:
        os.killpg(launch.pid, signal.SIGINT)  # Ctrl-C in the launch's terminal
        patience = Patience(120)  # the ranks' step and checkpoint, on a quiet box; stretched by the load
        assert patience.until(lambda: launch.poll() is not None, 0.1), \
            f"the launch not ended after {patience.waited()}: {log.read_text()[-4000:]}"
        assert launch.returncode == 130, log.read_text()[-4000:]
        _wait_until_gone(out_dir)
    finally:
        _kill_leftovers(out_dir, launch)
    text = log.read_text()
    assert text.rstrip().endswith("meshwright launch: interrupted"), text[-2000:]
    summary = json.loads((out_dir / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by"] == "SIGHUP" and summary["world_size"] == 2 and 2 <= stopped < steps
    from meshwright.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(out_dir / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}" and (ckpt / "rng_rank00001.pt").is_file()


def test_deepspeed_env_and_ssh_options_are_quoted():
    from meshwright.launcher.remote.argv import dry_run_lines, env_script_text, pdsh_ssh_args

    words = shlex.split(pdsh_ssh_args("/keys/my key'$(id)", "-o UserKnownHostsFile=/dev/null"))
    assert words[:2] == ["-o", "UserKnownHostsFile=/dev/null"] and words[-2:] == ["-i", "/keys/my key'$(id)"]
    spec = LaunchSpec(hosts=[Host("n0", 2), Host("n1", 2)], train_args=["train", "default"], env={"B": "2", "A": "x y"})
    assert env_script_text(spec) == "export A='x y'\nexport B=2\n"  # sourced from a 0600 file, values quoted
    lines = dry_run_lines(spec, "deepspeed", "/etc/hostfile")
    assert lines[0] == "# every host sources these from a file only you can read (--venv_script): 'A=x y' B=2"
    assert lines[1].startswith("deepspeed --hostfile=")
    with pytest.raises(ConfigError, match="env="):
        LaunchSpec(hosts=[Host("n0", 1)], train_args=["train", "x"], env={"A": "1\nB=2"}).validate()


def test_torchrun_env_values_travel_in_a_private_file_not_the_command_line(sshd, tmp_path):
    """--env values reach every host intact through a 0600 file (sourced, then removed), never a command line,
    and nothing hidden in them runs."""
    from meshwright.launcher.remote.argv import remote_env_file, remote_shell_command, torchrun_argv

    marker = tmp_path / "pwned"
    value = f"x $(touch {marker}) `touch {marker}` 'q' \"d\""
    script = tmp_path / "printenv-python"
    script.write_text("#!/bin/sh\nprintf 'A=%s|\\n' \"$A\"\nls -A .meshwright\n")
    script.chmod(0o755)
    spec = LaunchSpec(hosts=[Host("127.0.0.1", 1), Host("127.0.0.2", 1)], train_args=["train", "default"],
                      python=str(script), workdir=str(tmp_path), env={"A": value})
    assert value not in remote_shell_command(spec, torchrun_argv(spec, 0), remote_env_file(spec, 0))
    out = io.StringIO()
    results = run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(), sink=out,
                           known_hosts=str(sshd.known_hosts))
    assert [r.exit_code for r in results] == [0, 0], out.getvalue()
    text = out.getvalue()
    assert f"[127.0.0.1] A={value}|" in text and f"[127.0.0.2] A={value}|" in text
    assert not marker.exists()
    assert not list((tmp_path / ".meshwright").iterdir())  # each host removed its file after sourcing it


def stoppable_python(tmp_path: Path) -> Path:
    """Stands in for the hosts' python as torchrun with preempting ranks behaves: SIGTERM or SIGUSR1 starts a
    checkpoint that lasts until the test writes ``release``, then exit 143; each host records every signal it got.
    A host with a ``finishN`` file ends at once (exit 0)."""
    script = tmp_path / "fakepython"
    script.write_text(
        "#!/bin/sh\n"
        "case \"$*\" in *--node-rank=1*) node=1;; *) node=0;; esac\n"
        f"rec={tmp_path}/node$node.txt\n"
        "trap 'echo INT >> $rec; exit 130' INT\n"
        "trap 'echo HUP >> $rec; exit 129' HUP\n"
        "save() { echo \"$1\" >> $rec; echo \"node $node saving after $1\"; "
        f"while [ ! -e {tmp_path}/release ]; do sleep 0.05; done; echo \"node $node saved\"; exit 143; }}\n"
        "trap 'save TERM' TERM\n"
        "trap 'save USR1' USR1\n"
        f"if [ -e {tmp_path}/finish$node ]; then echo \"node $node done\"; exit 0; fi\n"
        "echo \"node $node waiting\"\n"
        "i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n"
        "echo 'not stopped'; exit 0\n"
    )
    script.chmod(0o755)
    return script


def test_sigterm_and_sigusr1_of_the_launch_reach_every_host_as_themselves(sshd, tmp_path):
    """SIGTERM to `meshwright launch` (a scheduler's stop) reaches each host's torchrun as SIGTERM, through the
    process group each host's command reported, not as a Ctrl-C (the pty's SIGINT: ranks stopped without a
    checkpoint); the launch waits for the hosts and raises LaunchStopped (exit 143). A second SIGTERM, and a
    SIGUSR1 after it, are not passed on (torchrun would restart its wait for the ranks, and leave them at a third).
    Then SIGUSR1 alone,
    with one host already ended: only the running host gets it, as SIGUSR1."""
    import threading

    from meshwright.launcher.remote.relay import LaunchStopped

    spec = LaunchSpec(hosts=[Host("127.0.0.1", 1), Host("127.0.0.2", 1)], train_args=["train", "default"],
                      python=str(stoppable_python(tmp_path)), workdir=str(tmp_path))
    main = threading.get_ident()

    def wait_for(out: io.StringIO, text: str, count: int) -> bool:
        deadline = time.monotonic() + 60
        while out.getvalue().count(text) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        return out.getvalue().count(text) >= count

    def launch(signals: list[tuple[str, int, int]], ready: list[str]) -> tuple[str, LaunchStopped, list[bool]]:
        """Start the launch; once every line of ``ready`` is out, for each (text, count, signum): send it, then wait for
        ``count`` lines with ``text``; then release the hosts' checkpoints."""
        out, seen = io.StringIO(), []

        def send() -> None:
            seen.append(all(wait_for(out, line, 1) for line in ready))
            for text, count, signum in signals:
                signal.pthread_kill(main, signum)
                seen.append(wait_for(out, text, count))
            (tmp_path / "release").write_text("")

        sender = threading.Thread(target=send)
        sender.start()
        try:
            with pytest.raises(LaunchStopped) as stop:
                run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=_connect_s(), sink=out,
                             known_hosts=str(sshd.known_hosts))
        finally:
            sender.join(90)
        return out.getvalue(), stop.value, seen

    text, stop, seen = launch([("saving after TERM", 2, signal.SIGTERM),
                               ("SIGTERM not passed on: SIGTERM already was", 1, signal.SIGTERM),
                               ("SIGUSR1 not passed on: SIGTERM already was", 1, signal.SIGUSR1)],
                              ready=["node 0 waiting", "node 1 waiting"])
    assert seen == [True] * 4, text
    assert stop.name == "SIGTERM" and stop.missed == [] and stop.started, text
    for node, host in enumerate(("127.0.0.1", "127.0.0.2")):
        assert (tmp_path / f"node{node}.txt").read_text() == "TERM\n", text  # once, as itself: no INT, no HUP
        assert f"[{host}] node {node} saved" in text, text
    assert "meshwright-launch-pgid" not in text  # the hosts' process group lines are taken, not shown
    assert text.count("meshwright launch: SIGTERM passed on to the torchrun of every host still running") == 1

    for f in ("node0.txt", "node1.txt", "release"):
        (tmp_path / f).unlink()
    (tmp_path / "finish1").write_text("")
    text, stop, seen = launch([("saving after USR1", 1, signal.SIGUSR1)], ready=["node 0 waiting", "node 1 done"])
    assert seen == [True, True] and "[127.0.0.2] node 1 done" in text, text
    assert stop.name == "SIGUSR1" and (tmp_path / "node0.txt").read_text() == "USR1\n", text
    assert not (tmp_path / "node1.txt").exists()  # the host already ended got nothing


def _rank_python(tmp_path: Path, exits: Path) -> Path:
    """torchrun's worker python (``PYTHON_EXEC``): runs ``-u -m meshwright.cli ...`` in this process, as python would
    (signals reach the rank itself), and appends ``RANK STATUS`` to ``exits`` at its ``os._exit`` (a torchrun
    worker ends there: ``mesh.exit_worker``)."""
    script = tmp_path / "rank-python"
    script.write_text(
        f"#!{sys.executable}\n"
        "import os, runpy, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[:3] == ['-u', '-m', 'meshwright.cli'], args\n"
        "sys.stdout.reconfigure(line_buffering=True)\n"
        "sys.argv = ['meshwright.cli', *args[3:]]\n"
        "real_exit = os._exit\n"
        "def recorded_exit(code):\n"
        f"    with open({str(exits)!r}, 'a') as fh:\n"
        "        fh.write(f\"{os.environ['RANK']} {code}\\n\")\n"
        "    real_exit(code)\n"
        "os._exit = recorded_exit\n"
        "runpy.run_module('meshwright.cli', run_name='__main__', alter_sys=True)\n")
    script.chmod(0o755)
    return script


@pytest.mark.timeout(600)
def test_sigterm_to_the_launch_preempts_every_rank_with_a_checkpoint_and_sigusr1_after_a_resume(sshd, tmp_path):
    """SIGTERM to `meshwright launch` (what Slurm or Kubernetes sends the process it started): every rank on both
    "hosts" gets SIGTERM (torchrun passes on what the launch sent its process group), stops after the same step with
    a checkpoint there and exits 143; the launch waits for them and exits 143. Before, it went on as a Ctrl-C over the
    ptys: the ranks stopped in their step without a checkpoint. Then the same launch with `--resume` continues from
    that checkpoint, and SIGUSR1 (Slurm's --signal) stops it the same way."""
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n127.0.0.2 slots=1\n")
    out_dir = tmp_path / "run"
    exits = tmp_path / "rank.exits"
    rank_python = _rank_python(tmp_path, exits)
    from meshwright.train.checkpoint import latest_checkpoint

    steps = 2000  # never reached
    records = out_dir / "log.jsonl"

    def launch(log: Path, *extra: str):
        def start() -> subprocess.Popen:
            with open(log, "w") as fh:
                return subprocess.Popen(
                    [sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port",
                     str(sshd.port), "--ssh-key", str(sshd.key), "--ssh-known-hosts", str(sshd.known_hosts),
                     "--connect-timeout", str(_connect_s()),
                     "--python", sys.executable, "--workdir", str(REPO), "--rdzv-port", str(free_port()),
                     "--env", "OMP_NUM_THREADS=1", "--env", f"PYTHONPATH={REPO}", "--env", f"PYTHON_EXEC={rank_python}",
                     *_STRETCHED_ENV,
                     "--", "train", "tiny-test", f"steps={steps}", "eval_every=0", "log_every=1", "data.max_files=20",
                     "ckpt_every=0", "progress=false", f"out_dir={out_dir}", *extra],
                    stdout=fh, stderr=subprocess.STDOUT, cwd=REPO)  # the launch's own group: only it gets the signal

        return start

    def stop(start, log: Path, signum: int, after: int) -> tuple[int, str]:
        launch_proc = _started(start, out_dir, log, after)
        try:
            launch_proc.send_signal(signum)
            patience = Patience(180)
            assert patience.until(lambda: launch_proc.poll() is not None, 0.1), \
                f"the launch not ended after {patience.waited()}: {log.read_text()[-4000:]}"
            assert launch_proc.returncode == 143, log.read_text()[-4000:]
            _wait_until_gone(out_dir)
        finally:
            _kill_leftovers(out_dir, launch_proc)
        summary = json.loads((out_dir / "summary.json").read_text())
        assert summary["stopped_by"] == signal.Signals(signum).name and summary["world_size"] == 2, summary
        stopped = summary["steps"]
        ckpt = latest_checkpoint(out_dir / "ckpt")
        assert ckpt is not None and ckpt.name == f"step_{stopped:06d}", summary
        assert (ckpt / "rng_rank00000.pt").is_file() and (ckpt / "rng_rank00001.pt").is_file()
        assert [json.loads(line) for line in records.read_text().splitlines()][-1]["step"] == stopped
        return stopped, log.read_text()

    first, text = stop(launch(tmp_path / "launch1.txt"), tmp_path / "launch1.txt", signal.SIGTERM, 2)
    assert 2 <= first < steps
    assert sorted(exits.read_text().splitlines()) == ["0 143", "1 143"], text[-4000:]  # every rank: preempted
    assert "meshwright launch: SIGTERM passed on to the torchrun of every host still running" in text, text[-4000:]
    assert text.rstrip().splitlines()[-1].startswith("meshwright launch: stopped by SIGTERM"), text[-2000:]
    assert "Ctrl-C" not in text and "[default0]:meshwright train: interrupted" not in text, text[-4000:]

    exits.unlink()
    second, text = stop(launch(tmp_path / "launch2.txt", "--resume"), tmp_path / "launch2.txt", signal.SIGUSR1,
                        first + 2)
    resumed = [line for line in text.splitlines() if "resumed from " in line]
    assert second >= first + 2 and len(resumed) == 1 and resumed[0].endswith(f" at step {first}"), text[-4000:]
    assert sorted(exits.read_text().splitlines()) == ["0 143", "1 143"], text[-4000:]
    recs = [json.loads(line) for line in records.read_text().splitlines()]
    assert [r["step"] for r in recs] == list(range(1, second + 1))  # continued from the first stop's checkpoint
