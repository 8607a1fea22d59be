"""Launch commands: golden dry runs, hostile host names, hostfile validation, unreachable hosts."""

import contextlib
import shlex
import sys

import pytest

from meshwright.cli import main
from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    LaunchSpec, dry_run_lines, login_shell_neutral, posix_remote_script, remote_shell_command, torchrun_argv,
)
from meshwright.launcher.remote.hostfile import Host, load_hosts, parse_hostfile_text
from meshwright.launcher.remote.ssh import connect

TRAIN = ["train", "configs/train/default.yaml", "--plan", "auto"]


def spec(n_hosts: int, **kw) -> LaunchSpec:
    hosts = [Host(f"node{i}", 4) for i in range(n_hosts)]
    return LaunchSpec(hosts=hosts, train_args=TRAIN, python="/opt/venv/bin/python", workdir="/srv/run dir", **kw)


def test_torchrun_dry_run_golden_two_hosts():
    lines = dry_run_lines(spec(2), "torchrun", "hostfile", ssh_port=2222, ssh_key="/keys/id_ed25519")
    # the remote word runs /bin/sh whatever the login shell; the script's quotes travel as printf escapes (\047)
    assert lines == [
        f"[node{i}] ssh -o BatchMode=yes -p 2222 -i /keys/id_ed25519 node{i} 'exec /bin/sh -c '\"'\"'eval "
        "\"$(printf \"cd \\047/srv/run dir\\047 && echo meshwright-launch-pgid \\044\\044 && exec "
        f"/opt/venv/bin/python -m torch.distributed.run --nnodes=2 --node-rank={i} --nproc-per-node=4 "
        "--rdzv-backend=static --master-addr=node0 --master-port=29400 --max-restarts=0 "
        "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2 --tee=3 -m meshwright.cli train "
        "configs/train/default.yaml --plan auto\")\"'\"'\"''"
        for i in range(2)
    ]


def test_rendezvous_static_in_hostfile_order_unless_restarts_need_c10d():
    """Hosts are node ranks in hostfile order (static rendezvous, its store on the first host) by default; elastic
    restarts keep c10d, whose node order is torchrun's (by address); an explicit static with restarts on several
    hosts is one line."""
    for i in range(3):
        argv = torchrun_argv(spec(3), i)
        assert argv[4:8] == [f"--node-rank={i}", "--nproc-per-node=4", "--rdzv-backend=static", "--master-addr=node0"]
        assert "--master-port=29400" in argv and not any(a.startswith("--rdzv-endpoint") for a in argv)
    assert "--rdzv-backend=c10d" in torchrun_argv(spec(2, max_restarts=1), 0)
    assert "--rdzv-backend=c10d" in torchrun_argv(spec(2, rdzv="c10d"), 1)
    assert "--rdzv-backend=static" in torchrun_argv(spec(1, max_restarts=2, rdzv="static"), 0)  # one host: allowed
    with pytest.raises(ConfigError, match=r"^--rdzv='static' is invalid; valid: c10d or auto with --max-restarts 2"):
        spec(2, max_restarts=2, rdzv="static").validate()
    with pytest.raises(ConfigError, match=r"^--rdzv='etcd' is invalid; valid: one of auto, static, c10d"):
        spec(2, rdzv="etcd").validate()


def test_torchrun_passes_the_preemption_signals_on_unless_the_user_chose():
    """SIGUSR1 (Slurm --signal) is not among torchrun's default signals: sent to it, torchrun died alone and its
    ranks trained on. Every host's torchrun now passes it on; an --env PET_SIGNALS_TO_HANDLE is the user's own."""
    assert "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2" in torchrun_argv(spec(2), 1)
    mine = torchrun_argv(spec(2, env={"PET_SIGNALS_TO_HANDLE": "SIGTERM,SIGUSR2"}), 1)
    assert not any(a.startswith("--signals-to-handle") for a in mine)


def test_cli_rdzv_flag_reaches_the_commands(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("b slots=1\na slots=1\n")
    assert main(["launch", "--hosts", str(hf), "--dry-run", "--rdzv", "c10d", "--workdir", "/elsewhere", "--",
                 "train", "x"]) == 0
    out = capsys.readouterr().out
    assert out.count("--rdzv-backend=c10d --rdzv-endpoint=b:29400") == 2
    assert main(["launch", "--hosts", str(hf), "--dry-run", "--workdir", "/elsewhere", "--", "train", "x"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[b] ") and "--node-rank=0" in lines[0] and "--master-addr=b " in lines[0]
    assert lines[1].startswith("[a] ") and "--node-rank=1" in lines[1] and "--master-addr=b " in lines[1]


def test_torchrun_four_hosts_ranks_and_endpoint():
    s = spec(4, max_restarts=3, env={"NCCL_DEBUG": "WARN"})
    for i in range(4):
        argv = torchrun_argv(s, i)
        assert f"--node-rank={i}" in argv and "--nnodes=4" in argv and "--rdzv-endpoint=node0:29400" in argv
        assert "--max-restarts=3" in argv
    remote = posix_remote_script(s, torchrun_argv(s, 3))
    assert remote_shell_command(s, torchrun_argv(s, 3)) == login_shell_neutral(remote)
    # the remote script parses back to exactly the intended words
    words = shlex.split(remote)
    assert words[:7] == ["cd", "/srv/run dir", "&&", "echo", "meshwright-launch-pgid", "$$", "&&"]
    assert words[7:10] == ["exec", "env", "NCCL_DEBUG=WARN"]


def test_deepspeed_dry_run_golden():
    s = spec(2)
    s.workdir = "/srv/run"  # DeepSpeed's runner puts it on the remote line unquoted: a space is refused there
    lines = dry_run_lines(s, "deepspeed", "/etc/hostfile", ssh_port=2222)
    assert lines == [
        "deepspeed --hostfile=/etc/hostfile --master_addr=node0 --master_port=29400 --launcher=pdsh --num_nodes=2 "
        "--num_gpus=4 --ssh_port=2222 --no_local_rank --module meshwright.cli train configs/train/default.yaml --plan auto"
    ]


def standin_loop(pause: float) -> str:
    """The busy-wait of a shell stand-in (a runner, a rank) that a test ends by signal: bounded at 15 minutes of wall
    clock, so a test that fails before its signal (or is cut by its timeout) leaves no process running for ever."""
    return f"end=$(( $(date +%s) + 900 )); while [ $(date +%s) -lt $end ]; do sleep {pause}; done\n"


@pytest.mark.parametrize("name", ["a;rm", "$(reboot)", "a'b", 'a"b', "-oProxyCommand=x", "a..b", "a`b`"])
def test_hostile_host_names_rejected(name):
    with pytest.raises(ConfigError, match="host="):
        parse_hostfile_text(f"{name} slots=2\n")


def test_hostile_user_args_are_quoted_not_executed():
    s = LaunchSpec(hosts=[Host("node0", 1)], train_args=["train", "x; rm -rf /", "out_dir=$(id)"], workdir="/tmp/a b")
    remote = posix_remote_script(s, torchrun_argv(s, 0))
    assert shlex.split(remote)[-2:] == ["x; rm -rf /", "out_dir=$(id)"]


def test_hostfile_formats(tmp_path):
    assert parse_hostfile_text("# cluster\nnode-a slots=8\nnode-b slots=8  # second\n") == [Host("node-a", 8), Host("node-b", 8)]
    with pytest.raises(ConfigError, match="slots"):
        parse_hostfile_text("node-a slots=8\nnode-b slots=4\n")
    with pytest.raises(ConfigError, match="each host listed once"):
        parse_hostfile_text("node-a slots=8\nnode-a slots=8\n")
    y = tmp_path / "hosts.yaml"
    y.write_text("hosts:\n  - {name: 127.0.0.1, slots: 1, port: 2222}\n  - {name: 127.0.0.2, slots: 1, port: 2222}\n")
    assert [h.port for h in load_hosts(y)] == [2222, 2222]


def test_launch_without_fabric_is_one_line_error(monkeypatch):
    # the GPU image has no fabric/paramiko: a remote launch says so in one line instead of a ModuleNotFoundError
    monkeypatch.setitem(sys.modules, "fabric", None)
    with pytest.raises(ConfigError, match=r"^host='node0' cannot be reached over SSH: .*fabric.*pip install") as e:
        connect(Host("node0", 1), ssh_port=22, ssh_key=None, timeout=3)
    assert "\n" not in str(e.value)


def test_unreachable_host_is_one_line_error():
    pytest.importorskip("fabric", reason="the launch dependency fabric is not installed (the GPU image)")
    # Port 9 on loopback: nothing listens, the connection is refused at once.
    with pytest.raises(ConfigError, match=r"^host='127.0.0.1' is unreachable over SSH"):
        connect(Host("127.0.0.1", 1), ssh_port=9, ssh_key=None, timeout=3)


def test_cli_dry_run_and_bad_hostfile(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=2\nnode1 slots=2\n")
    assert main(["launch", "--hosts", str(hf), "--dry-run", "--python", "python3", "--workdir", "/w", "--", "train", "default"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2 and out[1].startswith("[node1] ssh -o BatchMode=yes node1 ")
    hf.write_text("bad;host slots=2\n")
    assert main(["launch", "--hosts", str(hf), "--dry-run", "--", "train", "default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "host='bad;host' is invalid" in err[0]


class _FakeConn:
    """A fabric Connection stand-in: records its commands and whether it was closed."""

    def __init__(self, name: str, upload_fails: bool = False) -> None:
        self.name, self.upload_fails, self.runs, self.closed = name, upload_fails, [], False

    def run(self, cmd: str, **kw):
        from types import SimpleNamespace

        self.runs.append((cmd, kw.get("asynchronous", False)))
        failed = self.upload_fails and "umask" in cmd
        return SimpleNamespace(exited=1 if failed else 0, stderr="Read-only file system" if failed else "")

    def close(self) -> None:
        self.closed = True


@pytest.mark.parametrize("failing", ["connect", "upload"])
def test_a_host_failing_before_the_start_leaves_nothing_running_or_open(monkeypatch, failing):
    """run_over_ssh connects every host and stores every --env file before any torchrun starts; when one of them
    fails, every connection is closed and the stored --env files (they hold the values) are removed. Before, the
    earlier hosts' connections stayed open and, after an --env upload failure, their torchruns were already running."""
    from meshwright.launcher.remote import ssh

    conns = [_FakeConn("node0"), _FakeConn("node1", upload_fails=failing == "upload"), _FakeConn("node2")]

    def fake_connect(host, *a, **k):
        if failing == "connect" and host.name == "node1":
            raise ConfigError("host='node1' is unreachable over SSH (timed out); valid: a host that accepts key-based SSH")
        return conns[int(host.name[-1])]

    monkeypatch.setattr(ssh, "connect", fake_connect)
    s = LaunchSpec(hosts=[Host(f"node{i}", 1) for i in range(3)], train_args=TRAIN, env={"HF_TOKEN": "secret"})
    with pytest.raises(ConfigError, match="node1"):
        ssh.run_over_ssh(s, sink=open("/dev/null", "w"))
    assert not [c for conn in conns for c, started in conn.runs if started]  # no torchrun was started anywhere
    reached = conns[:1] if failing == "connect" else conns[:2]
    assert all(c.closed for c in reached) and not conns[2].runs
    if failing == "upload":  # node0's stored file is removed; node1 stored none
        from meshwright.launcher.remote.argv import remote_env_file, remove_file_command

        rm = "exec /bin/sh -c 'eval \"$(printf \"rm -f "
        removed = [[c for c, _ in conn.runs if c.startswith(rm)] for conn in conns]
        assert removed[0] == [remove_file_command(remote_env_file(s, 0))] and not removed[1]


@pytest.mark.timeout(60)
def test_a_deepspeed_launch_passes_ctrl_c_on_to_its_runner_and_closes_the_ssh_clients_left(tmp_path):
    """A stand-in for DeepSpeed's runner (its own process group) records the Ctrl-C passed on to it and ends, leaving
    an "ssh" (a copy of sleep) in a session of its own, as pdsh does; the launch waits for the runner, then SIGTERMs
    that ssh by its recorded pid (its connection closing hangs up the host's pty), and says it was interrupted. An
    unrelated process named in the pid file (not that ssh) is spared."""
    import os
    import shutil
    import signal
    import subprocess
    import threading

    from helpers import ended
    from meshwright.commands.launch import _run_passing_signals_on
    from patience import Patience

    fake_ssh = tmp_path / "ssh"
    shutil.copy(shutil.which("sleep"), fake_ssh)
    pids = tmp_path / "ssh.pids"
    # both outlive any test (killed below): one that ended by itself would pass "spared" or "stopped" by luck
    other = subprocess.Popen([shutil.which("sleep"), "3600"])
    runner = tmp_path / "runner"
    runner.write_text(
        "#!/bin/sh\n"
        f"setsid {fake_ssh} 3600 & echo $! >> {pids}\n"
        f"echo {other.pid} >> {pids}\n"
        f"trap 'echo INT > {tmp_path}/runner.got; exit 1' INT\n"
        f"touch {tmp_path}/ready\n"
        + standin_loop(0.1))
    runner.chmod(0o755)
    main_thread = threading.get_ident()

    def press() -> None:  # once the runner's trap is set: 30 s of quiet-box time at most (tests/patience.py)
        Patience(30).until((tmp_path / "ready").exists)
        signal.pthread_kill(main_thread, signal.SIGINT)

    threading.Thread(target=press, daemon=True).start()
    ssh_pid = None
    try:
        with pytest.raises(KeyboardInterrupt):
            _run_passing_signals_on([str(runner)], cwd=str(tmp_path), env=dict(os.environ),
                                    ssh=(pids, str(fake_ssh)))
        assert (tmp_path / "runner.got").read_text() == "INT\n"
        ssh_pid = int(pids.read_text().split()[0])
        assert Patience(10).until(lambda: ended(ssh_pid)), "the ssh left by the runner still runs"
        assert other.poll() is None  # not an ssh: spared
    finally:
        other.kill()
        other.wait(10)
        if ssh_pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(ssh_pid, signal.SIGKILL)


@pytest.mark.timeout(60)
def test_a_ctrl_c_while_deepspeeds_runner_starts_is_passed_on_once_it_has(tmp_path, monkeypatch):
    """Ctrl-C as the runner has just started, before Popen has returned it (a long moment on a busy box: seen in a
    loop of the test above at load 135): the launch's handlers are already in, and the runner gets the Ctrl-C once
    it is known. Before, the handlers came after Popen: KeyboardInterrupt left the runner (a session of its own)
    running, orphaned, and it never got the Ctrl-C."""
    import os
    import signal
    import subprocess

    from meshwright.commands import launch
    from patience import Patience

    runner = tmp_path / "runner"
    runner.write_text(f"#!/bin/sh\ntrap 'echo INT >> {tmp_path}/runner.got; exit 1' INT\ntouch {tmp_path}/ready\n"
                      + standin_loop(0.05))
    runner.chmod(0o755)
    real_popen, started = subprocess.Popen, []

    def popen_then_ctrl_c(*args, **kwargs):
        proc = real_popen(*args, **kwargs)
        started.append(proc)
        assert Patience(30).until((tmp_path / "ready").exists)  # its trap is set
        signal.raise_signal(signal.SIGINT)  # Ctrl-C before Popen returns
        return proc

    monkeypatch.setattr(launch.subprocess, "Popen", popen_then_ctrl_c)
    try:
        with pytest.raises(KeyboardInterrupt):
            launch._run_passing_signals_on([str(runner)], cwd=str(tmp_path), env=dict(os.environ), ssh=None)
        assert (tmp_path / "runner.got").read_text() == "INT\n"  # once
        assert started[0].poll() == 1
    finally:
        if started and started[0].poll() is None:
            os.killpg(started[0].pid, signal.SIGKILL)
            started[0].wait(10)


def test_the_process_group_line_is_taken_once_and_the_signal_command_reaches_that_group(tmp_path):
    """Each host's first `meshwright-launch-pgid N` line is its process group (not shown; a later one, or a malformed
    one, is ordinary output); the command sent to stop it signals that group with a fixed signal name, run here by
    /bin/sh against a real process group of its own (a session leader, as sshd's pty makes the host's shell)."""
    import io
    import os
    import signal
    import subprocess
    import threading

    from meshwright.launcher.remote.argv import PGID_MARKER, parse_pgid_line, signal_group_command
    from meshwright.launcher.remote.ssh import PrefixedStream

    assert parse_pgid_line(f"{PGID_MARKER} 4242\r") == 4242
    for line in (f"{PGID_MARKER} 1", f"{PGID_MARKER} 0", f"{PGID_MARKER} -5", f"{PGID_MARKER} 4x", f"{PGID_MARKER}",
                 f"{PGID_MARKER} ４２", f"x {PGID_MARKER} 42", "4242"):
        assert parse_pgid_line(line) is None, line
    for bad in (1, 0, -3, True, "42"):
        with pytest.raises(ValueError):
            signal_group_command(bad, "TERM")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        signal_group_command(42, "KILL; id")

    out = io.StringIO()
    stream = PrefixedStream("h", out, threading.Lock())
    stream.write(f"motd\r\n{PGID_MARKER} 4242\r\nrank 0 up\n{PGID_MARKER} 7\n")
    assert stream.pgid == 4242
    assert out.getvalue() == f"[h] motd\n[h] rank 0 up\n[h] {PGID_MARKER} 7\n"

    got = tmp_path / "got"
    leader = subprocess.Popen(["/bin/sh", "-c", f"trap 'echo TERM > {got}; exit 143' TERM; echo {PGID_MARKER} $$; "
                               "while :; do sleep 0.05; done"], stdout=subprocess.PIPE, text=True,
                              start_new_session=True)
    try:
        pgid = parse_pgid_line(leader.stdout.readline())
        assert pgid == leader.pid == os.getpgid(leader.pid)
        sent = subprocess.run(["/bin/sh", "-c", signal_group_command(pgid, "TERM")], capture_output=True, text=True,
                              timeout=30)
        assert sent.returncode == 0, sent.stderr
        assert leader.wait(30) == 143 and got.read_text() == "TERM\n"
    finally:
        if leader.poll() is None:
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait(10)
    # a group gone since: the command fails (its host ended meanwhile), one line on stderr
    gone = subprocess.run(["/bin/sh", "-c", signal_group_command(pgid, "TERM")], capture_output=True, text=True,
                          timeout=30)
    assert gone.returncode != 0 and len(gone.stderr.strip().splitlines()) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("signame", ["SIGTERM", "SIGUSR1"])
def test_a_deepspeed_launch_passes_sigterm_or_sigusr1_on_as_sigterm_and_waits_for_the_ranks(tmp_path, signame):
    """One host under --launcher deepspeed: DeepSpeed's runner and launcher and the ranks share the launch's child
    process group. SIGTERM or SIGUSR1 to the launch reaches that group as SIGTERM (the signal DeepSpeed's processes
    handle; SIGUSR1's default action killed them), the runner ends at once, and the launch waits for a "rank" still
    writing its checkpoint, then raises LaunchStopped (exit 143), not KeyboardInterrupt."""
    import os
    import signal
    import threading

    from meshwright.commands.launch import _run_passing_signals_on
    from meshwright.launcher.remote.relay import LaunchStopped
    from patience import Patience

    rank = tmp_path / "rank"
    rank.write_text(f"#!/bin/sh\ntrap 'echo TERM >> {tmp_path}/rank.got; sleep 1; touch {tmp_path}/saved; exit 143' TERM\n"
                    f"touch {tmp_path}/ready\n" + standin_loop(0.05))
    runner = tmp_path / "runner"
    runner.write_text(f"#!/bin/sh\n{rank} &\ntrap 'echo TERM > {tmp_path}/runner.got; exit 1' TERM\n"
                      + standin_loop(0.05))
    for f in (rank, runner):
        f.chmod(0o755)
    main_thread = threading.get_ident()

    def send() -> None:  # once the rank's trap is set: 30 s of quiet-box time at most (tests/patience.py)
        Patience(30).until((tmp_path / "ready").exists)
        signal.pthread_kill(main_thread, signal.Signals[signame])

    threading.Thread(target=send, daemon=True).start()
    with pytest.raises(LaunchStopped) as stop:
        _run_passing_signals_on([str(runner)], cwd=str(tmp_path), env=dict(os.environ), ssh=None)
    assert stop.value.name == signame and "as SIGTERM" in stop.value.message()
    assert (tmp_path / "saved").exists()  # the launch ended after the rank's checkpoint, not with its runner
    assert (tmp_path / "rank.got").read_text() == "TERM\n" and (tmp_path / "runner.got").read_text() == "TERM\n"


def test_the_stop_relay_waits_for_a_process_group_skips_ended_hosts_and_hangs_up_where_it_cannot_send():
    """The relay sends the first SIGTERM once per running host, when that host has reported its process group; a host
    already ended gets nothing; a host whose connection is gone (the command cannot be sent) is hung up on instead, said
    in one line; a second signal, or one after a Ctrl-C, is said and not passed on."""
    import signal
    from types import SimpleNamespace

    from meshwright.launcher.remote.argv import signal_group_command
    from meshwright.launcher.remote.relay import LaunchStopped, StopRelay

    class Conn:
        def __init__(self, gone: bool = False) -> None:
            self.gone, self.sent, self.closed = gone, [], False

        def run(self, cmd: str, **kw):
            if self.gone:
                raise OSError("Socket is closed")
            self.sent.append(cmd)
            return SimpleNamespace(exited=0, stderr="", stdout="")

        def close(self) -> None:
            self.closed = True

    conns = [Conn(), Conn(gone=True), Conn(), Conn()]
    pgids: list[int | None] = [101, 202, None, 404]
    said: list[str] = []
    relay = StopRelay(["h0", "h1", "h2", "h3"], conns, lambda i: pgids[i], said.append, timeout=5)

    def turn(running: list[bool], interrupted: bool = False) -> None:
        relay.pass_on(running, interrupted)
        for t in list(relay._threads.values()):
            t.join(10)

    relay.record(signal.SIGTERM, None)
    turn([True, True, True, False])
    assert said == ["meshwright launch: SIGTERM passed on to the torchrun of every host still running: their ranks stop "
                    "after the same step with a checkpoint; waiting for them"]
    assert conns[0].sent == [signal_group_command(101, "TERM")] and not conns[2].sent and not conns[3].sent
    turn([True, True, True, False])  # h1's send failed: hung up on, once; h2 has not reported its group yet
    pgids[2] = 303
    relay.record(signal.SIGTERM, None)
    turn([True, True, True, False])
    turn([True, True, True, False])
    assert conns[1].closed and not conns[0].closed and relay.missed == [1]
    assert said[1] == ("meshwright launch: could not pass SIGTERM on to host h1 (Socket is closed); hanging up on it "
                       "instead (SIGHUP: its ranks stop the same way)")
    assert said[2:] == ["meshwright launch: SIGTERM not passed on: SIGTERM already was; waiting for the hosts' "
                        "checkpoints"]
    assert conns[0].sent == [signal_group_command(101, "TERM")] and conns[2].sent == [signal_group_command(303, "TERM")]
    assert not conns[3].sent  # ended before the signal
    assert LaunchStopped(signal.SIGTERM, ["h1"]).message().startswith(
        "stopped by SIGTERM: passed on to every host's torchrun; the ranks stop after the same step with a checkpoint")

    after_ctrl_c = StopRelay(["h0"], [Conn()], lambda i: 7, said.append, timeout=5)
    after_ctrl_c.record(signal.SIGUSR1, None)
    after_ctrl_c.pass_on([True], interrupted=True)
    assert after_ctrl_c.signum is None and not after_ctrl_c.conns[0].sent
    assert said[-1] == "meshwright launch: SIGUSR1 not passed on: the hosts are already stopping after Ctrl-C"


def test_a_stop_signal_while_the_hosts_are_connected_starts_nothing(monkeypatch):
    """SIGTERM while the launch connects (before any torchrun starts): nothing is started, every connection is
    closed, the stored --env files are removed, and the launch says it was stopped (LaunchStopped, started=False:
    exit 143). Before, SIGTERM there killed the launch at once."""
    import os
    import signal

    from meshwright.launcher.remote import ssh
    from meshwright.launcher.remote.relay import LaunchStopped

    conns = [_FakeConn("node0"), _FakeConn("node1")]

    def fake_connect(host, *a, **k):
        if host.name == "node1":
            os.kill(os.getpid(), signal.SIGTERM)  # the scheduler's stop, taken by the launch's handler
        return conns[int(host.name[-1])]

    monkeypatch.setattr(ssh, "connect", fake_connect)
    s = LaunchSpec(hosts=[Host(f"node{i}", 1) for i in range(2)], train_args=TRAIN, env={"HF_TOKEN": "secret"})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(LaunchStopped) as stop:
        ssh.run_over_ssh(s, sink=open("/dev/null", "w"))
    assert stop.value.name == "SIGTERM" and not stop.value.started
    assert stop.value.message() == "SIGTERM received before any host started: nothing was started"
    assert signal.getsignal(signal.SIGTERM) is before  # the launch's handler is gone again
    assert not [c for conn in conns for c, started in conn.runs if started] and all(c.closed for c in conns)
    rm = "exec /bin/sh -c 'eval \"$(printf \"rm -f "
    assert all(len([c for c, _ in conn.runs if c.startswith(rm)]) == 1 for conn in conns)  # both --env files removed
