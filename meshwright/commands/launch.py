"""`meshwright launch`: start a training run on many hosts with torchrun (over SSH) or deepspeed."""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import subprocess
import sys
from typing import Any


MAX_CONNECT_TIMEOUT_S = 3600.0  # an hour; a socket timeout past ~9.2e9 s was an OverflowError traceback in paramiko


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="launch `meshwright train` on many hosts (torchrun over SSH, or the deepspeed launcher)",
        description="Example: meshwright launch --hosts hostfile --launcher torchrun -- train configs/train/default.yaml --plan auto",
    )
    p.add_argument("--hosts", required=True, help="DeepSpeed-style hostfile ('HOST slots=N' lines) or a YAML with hosts: [{name, slots}]")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--ssh-port", type=int, default=None, help="SSH port of every host (default 22 or the hostfile's)")
    p.add_argument("--ssh-key", default=None, help="private key file; SSH is key-only")
    p.add_argument("--ssh-known-hosts", default=None, metavar="FILE",
                   help="known_hosts file the hosts' keys must be in (default: ~/.ssh/known_hosts, as ssh); "
                        "unknown or changed host keys are refused")
    p.add_argument("--rdzv-port", type=int, default=29400,
                   help="rendezvous (static: master; c10d: endpoint) port on the first host")
    p.add_argument("--max-restarts", type=int, default=0,
                   help="elastic restarts (0..10,000); the trainer resumes from the latest checkpoint")
    p.add_argument("--rdzv", choices=("auto", "static", "c10d"), default="auto",
                   help="torchrun's rendezvous: static numbers the hosts in hostfile order (the first runs rank 0); "
                        "c10d is elastic (torchrun orders hosts by address) and needed for restarts across hosts; "
                        "auto: static, c10d with --max-restarts > 0")
    p.add_argument("--python", default=sys.executable, help="python on the hosts (default: this interpreter's path)")
    p.add_argument("--workdir", default=os.getcwd(), help="directory on the hosts to run in (default: this one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment to set on every host (repeatable)")
    p.add_argument("--connect-timeout", type=float, default=10.0,
                   help=f"seconds to wait for each host's SSH connection (at most {MAX_CONNECT_TIMEOUT_S:g})")
    p.add_argument("--dry-run", action="store_true", help="print the exact per-host commands and exit")
    p.add_argument("train_command", nargs=argparse.REMAINDER, help="-- train CONFIG [--plan PLAN|auto] [key=value ...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshwright.errors import invalid
    from meshwright.launcher.remote.argv import (
        MAX_RESTARTS, MAX_SHUTDOWN_S, SHUTDOWN_MARGIN_S, LaunchSpec, dry_run_lines, shutdown_timeout_for, shutdown_timeout_warning,
        torchrun_shutdown_honoured,
    )
    from meshwright.launcher.remote.hostfile import load_hosts
    from meshwright.launcher.remote.relay import LaunchStopped
    from meshwright.launcher.remote.ssh import run_over_ssh, summarize_failure

    if args.ssh_port is not None and not 0 < args.ssh_port < 65536:
        raise invalid("--ssh-port", args.ssh_port, "an integer in 1..65535")
    if not 0 < args.connect_timeout <= MAX_CONNECT_TIMEOUT_S:
        raise invalid("--connect-timeout", args.connect_timeout, f"a positive number of seconds, at most "
                      f"{MAX_CONNECT_TIMEOUT_S:g}")
    if not 0 < args.rdzv_port < 65536:
        raise invalid("--rdzv-port", args.rdzv_port, "an integer in 1..65535")
    if not 0 <= args.max_restarts <= MAX_RESTARTS:
        raise invalid("--max-restarts", args.max_restarts, f"an integer in 0..{MAX_RESTARTS:,} (torchrun's restarts "
                      "after a worker failure; each resumes from the latest checkpoint)")
    if args.ssh_key is not None and not os.path.isfile(args.ssh_key):
        raise invalid("--ssh-key", args.ssh_key, "an existing private key file")
    if args.ssh_known_hosts is not None and not os.path.isfile(args.ssh_known_hosts):
        raise invalid("--ssh-known-hosts", args.ssh_known_hosts, "an existing known_hosts file")
    command = args.train_command[1:] if args.train_command[:1] == ["--"] else args.train_command
    hosts = load_hosts(args.hosts)
    grace_s, out_dir = _grace_from_overrides(command), None
    if command[:1] == ["train"] and os.path.realpath(args.workdir) == os.path.realpath(os.getcwd()):
        from meshwright.commands.train import preflight

        # the hosts run in this directory: a bad config, or a plan for another device count, fails here first
        cfg = preflight(command, world_size=sum(h.slots for h in hosts))
        grace_s, out_dir = cfg.preempt_grace_s, cfg.out_dir
    if shutdown_timeout_for(grace_s) >= MAX_SHUTDOWN_S:  # torchrun's wait after a stop signal: grace + margin
        raise invalid("preempt_grace_s", grace_s, f"less than {MAX_SHUTDOWN_S - SHUTDOWN_MARGIN_S:,} seconds under "
                      f"meshwright launch (torchrun waits that plus {SHUTDOWN_MARGIN_S} s for the ranks after a stop signal)")
    env = {}
    for item in args.env:
        if "=" not in item:
            raise invalid("env", item, "KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    spec = LaunchSpec(hosts=hosts, train_args=command, python=args.python, workdir=args.workdir,
                      rdzv_port=args.rdzv_port, max_restarts=args.max_restarts, env=env, rdzv=args.rdzv,
                      shutdown_timeout_s=shutdown_timeout_for(grace_s))
    spec.validate()
    if args.launcher == "torchrun":
        warning = shutdown_timeout_warning(spec, grace_s, torchrun_shutdown_honoured(spec.python))
        if warning:
            print(f"meshwright launch: {warning}", file=sys.stderr)
    if args.dry_run:
        if args.launcher == "deepspeed" and len(spec.hosts) > 1:  # what the launch would refuse, refused here too
            from meshwright.launcher.remote.argv import check_deepspeed_env_files, deepspeed_env_files

            check_deepspeed_env_files(deepspeed_env_files(spec.workdir, {k: v for k, v in os.environ.items()
                                                                          if k not in spec.env}))
        for line in dry_run_lines(spec, args.launcher, args.hosts, args.ssh_port, args.ssh_key):
            print(line)
        return 0
    # said as the hosts start, after every refusal (a refused launch says one line)
    note = other_workdir_note(args.workdir) if out_dir is None and command[:1] == ["train"] else None
    with _run_directory_lock(out_dir, spec.run_id):
        if args.launcher == "deepspeed":
            return run_deepspeed(spec, args, note=note)
        if note:
            print(f"meshwright launch: {note}", file=sys.stderr)
        try:
            results = run_over_ssh(spec, args.ssh_port, args.ssh_key, args.connect_timeout,
                                   known_hosts=args.ssh_known_hosts)
        except LaunchStopped as stop:
            return _stopped(stop)
    message = summarize_failure(results)
    if message:
        print(f"meshwright launch: {message}", file=sys.stderr)
        return 1
    return 0


def other_workdir_note(workdir: str) -> str:
    """What a launch into another ``--workdir`` does not protect (launcher/launch_lock.py): its config, and so its
    ``out_dir``, lives on the hosts' file system, which this host may not see (a path here need not be theirs)."""
    return (f"note: the hosts run in --workdir {workdir!r}, not this directory: their config and out_dir are not read "
            f"here, so no launch lock is taken; each attempt's rank 0 refuses an out_dir another live run holds "
            f"(train/run_dir.RunLock), after the hosts start, and a launch between two attempts of an elastic restart "
            f"can take it first (docs/launch.md, Run directory)")


@contextlib.contextmanager
def _run_directory_lock(out_dir: str | None, run_id: str):
    """Hold the run directory (the config's out_dir) for the launch's life (launcher/launch_lock.py): a second live
    launch into it is refused before any host starts. ``out_dir`` None (the hosts run in another --workdir, whose
    config is not read here): no lock; the run's rank 0 still refuses a directory in use (train/run_dir.RunLock)."""
    if out_dir is None:
        yield
        return
    from meshwright.launcher.launch_lock import acquire_launch_lock

    lock = acquire_launch_lock(out_dir, run_id)
    if lock.took_over is not None:
        print(f"meshwright launch: note: {lock.path} was left by launch {lock.took_over.get('run_id')} (host "
              f"{lock.took_over.get('host')}, pid {lock.took_over.get('pid')}), which has ended: taken over",
              file=sys.stderr)
    try:
        yield
    finally:
        lock.release()


def _grace_from_overrides(command: list[str]) -> float:
    """``preempt_grace_s`` as far as it can be known without the hosts' config file (another --workdir): its
    ``preempt_grace_s=`` override, else the config default (torchrun's own 30 s). A value that is no number is left
    to the run's own validation."""
    from meshwright.config import TrainConfig

    grace = TrainConfig.__dataclass_fields__["preempt_grace_s"].default
    for word in command[1:]:
        key, sep, value = word.partition("=")
        if sep and key == "preempt_grace_s":
            try:
                grace = float(value)
            except ValueError:
                pass
    return grace if 0 <= grace < float("inf") else 0.0


def _stopped(stop: Any) -> int:
    """A stop signal passed on and every host ended: the launch's last line, and the preempted run's exit status
    (143, as `meshwright train` preempted; a scheduler's wrapper requeues on it)."""
    from meshwright.train.preemption import EXIT_PREEMPTED

    print(f"meshwright launch: {stop.message()}", file=sys.stderr)
    return EXIT_PREEMPTED


def run_deepspeed(spec, args: argparse.Namespace, note: str | None = None) -> int:
    """Run DeepSpeed's own multi-node runner (pdsh over ssh) locally; it reaches every host itself.

    Hardened against its shell: the hostfile is rewritten in DeepSpeed's format from the parsed hosts (a YAML
    hostfile is not passed verbatim), train arguments are single-quoted for the remote shell line
    (``argv.deepspeed_user_args``), and ``--env`` values go into a 0600 script in the work directory that every
    host sources (``--venv_script``), never onto the remote command line. DeepSpeed's runner ``cd``s to the same
    work directory on every host, so that directory (and the script) must be shared, as the data already is. No
    ``.deepspeed_env`` is written; the user's, which the runner exports in double quotes, is checked first.
    The SSH key goes to pdsh's ssh through ``PDSH_SSH_ARGS_APPEND`` (DeepSpeed appends ``-p PORT`` to it).
    ``note`` (the launch's other-workdir note) is said once every check has passed, as the runner starts.
    """
    import shlex
    import shutil
    import tempfile
    from pathlib import Path

    from meshwright.errors import invalid
    from meshwright.launcher.remote.argv import (
        check_deepspeed_env_files, check_deepspeed_exports, deepspeed_argv, deepspeed_env_files,
        deepspeed_export_prefixes, deepspeed_hostfile_text, deepspeed_ssh_port, env_script_text, pdsh_ssh_args,
    )
    from meshwright.launcher.remote.relay import LaunchStopped

    ssh_port = deepspeed_ssh_port(spec.hosts, args.ssh_port)
    beside = Path(args.python).parent / "deepspeed"
    exe = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if exe is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install deepspeed so its `deepspeed` command is on PATH")
    if shutil.which("pdsh") is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install pdsh (DeepSpeed's multi-node runner uses it)")
    real_ssh = shutil.which("ssh")
    if real_ssh is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install an ssh client (openssh-client)")
    # the user's --env wins over the same names in this environment (which DeepSpeed would export unquoted)
    run_env = {k: v for k, v in os.environ.items() if k not in spec.env}
    run_env["PDSH_RCMD_TYPE"] = "ssh"
    if "PYTHONPATH" in spec.env and len(spec.hosts) > 1:
        # DeepSpeed always exports PYTHONPATH=<workdir>:<this PYTHONPATH> on the remote line, after the --env script is
        # sourced: an --env PYTHONPATH was overridden there. Given to the runner, it reaches the hosts (checked below)
        run_env["PYTHONPATH"] = spec.env["PYTHONPATH"]
    if len(spec.hosts) > 1:
        check_deepspeed_exports(run_env, deepspeed_export_prefixes())
        check_deepspeed_env_files(deepspeed_env_files(spec.workdir, run_env))  # the user's .deepspeed_env, if any
    env_script: Path | None = None
    with tempfile.TemporaryDirectory(prefix="meshwright-ds-") as tmp:
        hostfile = Path(tmp) / "hostfile"
        hostfile.write_text(deepspeed_hostfile_text(spec.hosts))
        # DeepSpeed's reachability probe runs a bare `ssh HOST hostname` and pdsh execs `ssh` from PATH:
        # a wrapper first on PATH gives both the key and the user's PDSH_SSH_ARGS_APPEND options.
        opts = pdsh_ssh_args(args.ssh_key, os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
        wrapper = Path(tmp) / "ssh"
        ssh_pids = Path(tmp) / "ssh.pids"  # each ssh's pid (the wrapper execs it): what an interrupt closes
        wrapper.write_text(f"#!/bin/sh\necho $$ >> {shlex.quote(str(ssh_pids))}\n"
                           f"exec {shlex.quote(real_ssh)} {opts} \"$@\"\n")
        wrapper.chmod(0o700)
        run_env["PATH"] = f"{tmp}{os.pathsep}{os.environ.get('PATH', '')}"
        if spec.env and len(spec.hosts) == 1:
            run_env.update(spec.env)  # one host: DeepSpeed runs it locally, with this environment
        elif spec.env:
            env_script = _private_file(Path(spec.workdir) / ".meshwright", env_script_text(spec))
        try:
            argv = deepspeed_argv(spec, hostfile, ssh_port, env_script=env_script.resolve() if env_script else None)
            argv[0] = exe
            if note:
                print(f"meshwright launch: {note}", file=sys.stderr)
            try:
                return _run_passing_signals_on(argv, cwd=spec.workdir, env=run_env,
                                               ssh=(ssh_pids, real_ssh) if len(spec.hosts) > 1 else None)
            except LaunchStopped as stop:
                return _stopped(stop)
        finally:
            if env_script is not None:
                env_script.unlink(missing_ok=True)


def _run_passing_signals_on(argv: list[str], cwd: str, env: dict[str, str], ssh: tuple[Any, str] | None) -> int:
    """Run DeepSpeed's runner in a process group of its own and pass each Ctrl-C, SIGHUP, SIGTERM or SIGUSR1 of the
    launch on to that whole group (the runner and pdsh; with one host DeepSpeed's local launcher and the ranks), as a
    terminal would, then wait for the runner and the rest of its group to end. SIGUSR1 goes on as SIGTERM: DeepSpeed's
    runner and launcher handle SIGTERM (they pass it on, then wait 30 s) and would die of SIGUSR1's default action,
    leaving the ranks unsupervised. ``ssh`` (several hosts: the file the ssh wrapper writes each pid to, and the real
    ssh): once the runner has ended after such a signal, the ssh clients pdsh started and left running get SIGTERM.
    They run in sessions of their own with pdsh's SIGINT blocked, and the runner's teardown signals pdsh alone (its
    remote ``pkill`` fails), so they kept their connections and the ranks trained on, orphaned (measured, as often as
    not: only where pdsh saw two SIGINTs before the runner's SIGTERM did it close them). Closed, each host's pty hangs
    up (``pdsh_ssh_args``'s ``-tt``): SIGHUP stops the ranks with a checkpoint. Before, ``subprocess.call`` SIGKILLed
    the runner at the first Ctrl-C, in its own teardown, and a SIGTERM killed the launch alone. After SIGTERM or
    SIGUSR1 it raises ``relay.LaunchStopped`` (exit 143), after Ctrl-C or SIGHUP KeyboardInterrupt (130)."""
    from meshwright.launcher.remote.relay import LaunchStopped

    passed: list[int] = []
    started: list[subprocess.Popen] = []  # the runner, once Popen has returned it
    unsent: list[int] = []  # signals that came before it

    def send(signum: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(started[0].pid, signal.SIGTERM if signum == signal.SIGUSR1 else signum)

    def pass_on(signum: int, frame: object) -> None:
        passed.append(signum)
        if started:
            send(signum)
        else:
            unsent.append(signum)

    # the handlers before the runner: a Ctrl-C while it starts (a long moment on a busy box) is passed on once it
    # has started; before, it raised KeyboardInterrupt here and the runner, in a session of its own, ran on orphaned
    signals = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)
    previous = {s: signal.signal(s, pass_on) for s in signals}
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, start_new_session=True)
        started.append(proc)  # from here the handler sends what comes
        if unsent:
            send(unsent[0])
        code = proc.wait()
        if passed:
            if ssh is not None:  # first: their hang-up is what stops the hosts' ranks
                _close_ssh_clients(*ssh)
            _wait_for_group(proc.pid)  # one host: DeepSpeed's launcher and the ranks may outlive the runner
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if passed and passed[0] in (signal.SIGTERM, signal.SIGUSR1):
        via = ("passed on to DeepSpeed's runner as SIGTERM, which reached the ranks" if ssh is None else
               "passed on to DeepSpeed's runner as SIGTERM, then its ssh clients were closed: each host's pty hung up "
               "and its ranks got SIGHUP")
        raise LaunchStopped(passed[0], via=via)
    if passed:
        raise KeyboardInterrupt  # the runner has ended: the launch says so once (exit 130), as with torchrun
    if code < 0:  # the runner died of a signal: the shell's convention
        return 128 - code
    return code


GROUP_WAIT_S = 75.0  # DeepSpeed's launcher waits 30 s for its ranks after SIGTERM, then SIGKILLs and waits 30 s more


def _wait_for_group(pgid: int, timeout: float = GROUP_WAIT_S) -> None:
    """Wait until no process is left in process group ``pgid`` (the runner's, which this launch created), at most
    ``timeout`` seconds: with one host DeepSpeed's launcher and the ranks finishing their checkpoint are in it, and a
    scheduler takes the launch's end as the run's."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.2)


def _close_ssh_clients(pid_file: Any, real_ssh: str) -> None:
    """SIGTERM to each pid in ``pid_file`` still running ``real_ssh`` (a reused pid runs something else: spared)."""
    from pathlib import Path

    try:
        pids = {int(w) for w in Path(pid_file).read_text().split()}
    except (OSError, ValueError):
        return
    exe = os.path.realpath(real_ssh)
    for pid in sorted(pids):
        try:
            if os.path.realpath(f"/proc/{pid}/exe") == exe:
                os.kill(pid, signal.SIGTERM)
        except (OSError, ProcessLookupError):
            continue


def _private_file(directory, text: str):
    """Write ``text`` to a new file only this user can read (created 0600, never world-readable in between)."""
    import secrets
    from pathlib import Path

    Path(directory).mkdir(parents=True, exist_ok=True)
    path = Path(directory) / f"launch-env-{os.getpid()}-{secrets.token_hex(4)}.sh"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path
