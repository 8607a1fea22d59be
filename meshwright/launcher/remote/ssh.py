"""Run one torchrun per host over SSH (fabric), stream prefixed output, stop everyone on a failure.

SSH is key-only: no passwords are ever sent, the agent is used only if no key is given. Host keys are checked
as OpenSSH checks them: against known_hosts, an unknown or changed key refused (fabric alone trusts any). Each host's
remote command runs under a pty so that closing the connection hangs up the remote process group,
which is how the other hosts are stopped when one fails. A Ctrl-C of the launch is not a hang-up: it is passed on
as each host's terminal would pass it (ETX on the pty: SIGINT to its torchrun), so the ranks stop as under a local
torchrun, and the launch waits for them; a second one is passed on too, a third hangs up. SIGTERM or SIGUSR1 of the
launch (a scheduler's stop) reaches each host's torchrun as itself, through its process group (``relay.py``): the
ranks stop after the same step with a checkpoint and the launch exits 143. Every command sent is wrapped by
``argv.login_shell_neutral``, so the hosts' login shells may be fish or csh/tcsh as well as sh/bash/zsh.
"""

from __future__ import annotations

import collections
import contextlib
import io
import os
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, TextIO

from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    LaunchSpec, env_script_text, parse_pgid_line, remote_env_file, remote_shell_command, remove_file_command,
    torchrun_argv, upload_env_command,
)
from meshwright.launcher.remote.hostfile import Host
from meshwright.launcher.remote.relay import LaunchStopped, StopRelay


class PrefixedStream:
    """File-like sink that prefixes each line with ``[host]`` and keeps the last lines for errors. The host's first
    ``argv.PGID_MARKER`` line is taken, not shown: ``pgid`` (what a stop signal is sent to)."""

    def __init__(self, prefix: str, sink: TextIO, lock: threading.Lock, keep: int = 20) -> None:
        self.prefix, self.sink, self.lock = prefix, sink, lock
        self.buf = ""
        self.tail: collections.deque[str] = collections.deque(maxlen=keep)
        self.pgid: int | None = None

    def write(self, text: str) -> int:
        self.buf += text.replace("\r\n", "\n").replace("\r", "\n")
        while "\n" in self.buf:
            line, self.buf = self.buf.split("\n", 1)
            if self.pgid is None and (pgid := parse_pgid_line(line)) is not None:
                self.pgid = pgid
                continue
            self.tail.append(line)
            with self.lock:
                self.sink.write(f"[{self.prefix}] {line}\n")
                self.sink.flush()
        return len(text)

    def flush(self) -> None:
        if self.buf:
            self.write("\n")


@dataclass
class HostResult:
    host: str
    exit_code: int | None
    tail: list[str]
    stopped_by_launcher: bool = False  # hung up because another host failed first
    failed_first: bool = False


GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def check_host_keys(conn: Any, known_hosts: str | None) -> None:
    """Verify host keys as OpenSSH does: fabric's ``Connection`` installs paramiko's ``AutoAddPolicy`` and loads no
    known_hosts, which trusted any key (a man in the middle included). Load ``known_hosts`` (else the ssh_config's
    ``UserKnownHostsFile`` or ``~/.ssh/known_hosts``, and the system file) and refuse keys not in them, unless the
    user's ssh_config says ``StrictHostKeyChecking no`` or ``accept-new`` for the host (a key that is known and
    differs is refused even then)."""
    import paramiko

    client = conn.client
    if known_hosts is not None:
        client.load_system_host_keys(known_hosts)  # read only: paramiko never writes back to "system" keys
    else:
        files = (conn.ssh_config.get("userknownhostsfile") or "~/.ssh/known_hosts").split()
        for f in files:
            path = os.path.expanduser(f)
            if os.path.isfile(path):
                client.load_system_host_keys(path)
        if os.path.isfile(GLOBAL_KNOWN_HOSTS):
            client.load_system_host_keys(GLOBAL_KNOWN_HOSTS)
    strict = str(conn.ssh_config.get("stricthostkeychecking", "ask")).lower()
    trust_new = strict in ("no", "off", "accept-new")
    client.set_missing_host_key_policy(paramiko.AutoAddPolicy() if trust_new else paramiko.RejectPolicy())


def connect(host: Host, ssh_port: int | None, ssh_key: str | None, timeout: float,
            known_hosts: str | None = None) -> Any:
    """Open a key-authenticated fabric Connection to a host whose key is known, or raise a one-line ConfigError
    naming the host."""
    try:  # a dependency, but absent where meshwright runs from a bare image (the GPU sessions'): one line, no traceback
        import paramiko
        from fabric import Connection
    except ImportError as exc:
        raise ConfigError(f"host={host.name!r} cannot be reached over SSH: {exc} (fabric and its paramiko are "
                          f"needed to launch on remote hosts; valid: pip install 'fabric>=3.2', or `launch --dry-run` "
                          f"to print the commands)") from None

    kwargs: dict[str, Any] = {"allow_agent": ssh_key is None, "look_for_keys": ssh_key is None, "banner_timeout": timeout,
                              "auth_timeout": timeout}
    if ssh_key:
        kwargs["key_filename"] = [ssh_key]
    conn = Connection(host.name, user=host.user, port=host.port or ssh_port or 22, connect_timeout=timeout,
                      connect_kwargs=kwargs)
    check_host_keys(conn, known_hosts)
    try:
        conn.open()
    except paramiko.BadHostKeyException:
        raise ConfigError(f"host={host.name!r} presented a host key that differs from the one in known_hosts "
                          f"(a reinstalled host, or someone in between); valid: a host whose key matches known_hosts "
                          f"(check it, then update the entry)") from None
    except Exception as exc:  # socket errors, auth failures, timeouts, unknown host keys
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        if "not found in known_hosts" in reason:
            raise ConfigError(f"host={host.name!r} has no key in known_hosts ({reason}); valid: a host whose key is "
                              f"in ~/.ssh/known_hosts or --ssh-known-hosts FILE (e.g. after `ssh {host.address}` "
                              f"once, checking the fingerprint)") from None
        raise ConfigError(f"host={host.name!r} is unreachable over SSH ({reason}); valid: a host that accepts key-based SSH") from None
    return conn


def run_over_ssh(spec: LaunchSpec, ssh_port: int | None = None, ssh_key: str | None = None,
                 connect_timeout: float = 10.0, sink: TextIO = sys.stdout, poll_s: float = 0.2,
                 known_hosts: str | None = None) -> list[HostResult]:
    """Start torchrun on every host; if any exits non-zero, hang up on the others. Returns per-host results.

    Every host is connected and given its --env file before any torchrun starts, and every connection is closed
    whatever fails: a host that could not be reached (or store its file) used to leave the earlier connections open,
    and the earlier hosts' torchruns running, waiting for a rendezvous that never completes. A SIGTERM or SIGUSR1
    is passed on to every host (``relay.StopRelay``); once they have all ended, ``relay.LaunchStopped`` is raised."""
    spec.validate()
    lock = threading.Lock()
    conns: list[Any] = []
    streams = [PrefixedStream(h.name, sink, lock) for h in spec.hosts]
    codes: list[int | None] = [None] * len(spec.hosts)
    failed = False
    first_failure: int | None = None
    stopped: set[int] = set()
    env_files: list[str | None] = []
    promises: list[Any] = []
    interrupts = 0

    def say(text: str) -> None:
        with lock:
            sink.write(text + "\n")
            sink.flush()

    relay = StopRelay([h.name for h in spec.hosts], conns, lambda i: streams[i].pgid, say, connect_timeout)
    try:
        with relay.installed():
            for h in spec.hosts:
                conns.append(connect(h, ssh_port, ssh_key, connect_timeout, known_hosts))
            for i, (host, conn) in enumerate(zip(spec.hosts, conns)):
                env_files.append(_upload_env(spec, conn, host, i) if spec.env else None)
            if relay.first_received() is not None:  # stopped while connecting: start nothing (the finally cleans up)
                raise LaunchStopped(relay.first_received(), started=False)
            promises = [conn.run(remote_shell_command(spec, torchrun_argv(spec, i), env_file), asynchronous=True,
                                 pty=True, warn=True, hide=False, out_stream=stream, err_stream=stream, in_stream=False)
                        for i, (conn, stream, env_file) in enumerate(zip(conns, streams, env_files))]
            while any(c is None for c in codes):
                try:
                    for i, p in enumerate(promises):
                        if codes[i] is None and p.runner.process_is_finished:
                            try:
                                codes[i] = p.join().exited
                            except Exception as exc:  # invoke raises for hung-up runners
                                codes[i] = getattr(getattr(exc, "result", None), "exited", 255) or 255
                            # interrupted or stopping (torchrun exits 1 after passing a signal on): each host stops
                            # itself; a hang-up would reach the others' ranks in their checkpoint
                            if codes[i] != 0 and not failed and not interrupts and relay.signum is None:
                                failed = True
                                first_failure = i
                                for j, conn in enumerate(conns):
                                    if codes[j] is None:
                                        stopped.add(j)
                                        conn.close()  # hangs up the pty: remote torchrun gets SIGHUP
                    relay.pass_on([c is None and j not in stopped for j, c in enumerate(codes)], bool(interrupts))
                    time.sleep(poll_s)
                except KeyboardInterrupt:
                    interrupts += 1
                    if interrupts > FORWARDED_INTERRUPTS:
                        raise  # the finally hangs up on every host
                    _forward_interrupt(promises, codes, sink, lock, interrupts)
        if interrupts:
            raise KeyboardInterrupt  # every host has stopped: the launch says so (exit 130)
        if relay.signum is not None:
            raise LaunchStopped(relay.signum, [spec.hosts[i].name for i in relay.missed])
    finally:
        for s in streams:
            s.flush()
        if not promises:  # nothing started: the --env files already stored would never be sourced and removed
            _discard_env_files(conns, env_files)
        for conn in conns:
            conn.close()
    return [HostResult(h.name, c, list(s.tail), i in stopped, i == first_failure)
            for i, (h, c, s) in enumerate(zip(spec.hosts, codes, streams))]


FORWARDED_INTERRUPTS = 2  # Ctrl-Cs passed on to the hosts; the next one hangs up on them


def _forward_interrupt(promises: list[Any], codes: list[int | None], sink: TextIO, lock: threading.Lock,
                       nth: int) -> None:
    """A Ctrl-C of the launch, passed on as the Ctrl-C a terminal on each host would send (ETX on its pty): the
    hosts' torchruns stop their ranks as a local Ctrl-C does (docs/training.md, "Interrupting a run"). Hanging up
    instead, as before, sent them SIGHUP: the ranks died at once, a checkpoint being written with them."""
    for i, p in enumerate(promises):
        if codes[i] is None:
            with contextlib.suppress(Exception):  # a host that ended meanwhile
                p.runner.send_interrupt(KeyboardInterrupt())
    then = ("press Ctrl-C again to abandon a checkpoint they are still writing" if nth < FORWARDED_INTERRUPTS else
            "press Ctrl-C again to hang up on them (their ranks then die at once)")
    with lock:
        sink.write(f"meshwright launch: Ctrl-C passed on to the torchrun of every host still running; waiting for "
                   f"them to stop ({then})\n")
        sink.flush()


def _discard_env_files(conns: list[Any], env_files: list[str | None]) -> None:
    """Remove the --env files stored on hosts whose torchrun never started (they hold the values); best effort: the
    launch is already failing with its own error."""
    for conn, path in zip(conns, env_files):
        if path is not None:
            try:
                conn.run(remove_file_command(path), pty=False, warn=True, hide=True)
            except Exception:  # noqa: BLE001 - a host gone since the upload: nothing more to do there
                pass


def _upload_env(spec: LaunchSpec, conn: Any, host: Host, node_rank: int) -> str:
    """Put the ``--env`` values in a 0600 file on ``host`` (sent over the SSH channel's stdin, never on a command
    line); the remote command sources and removes it. Returns its path."""
    path = remote_env_file(spec, node_rank)
    result = conn.run(upload_env_command(path), in_stream=io.StringIO(env_script_text(spec)), pty=False, warn=True,
                      hide=True)
    if result.exited != 0:
        raise ConfigError(f"host={host.name!r} could not store the --env file {path} "
                          f"({(result.stderr.strip().splitlines() or ['exit ' + str(result.exited)])[-1]}); "
                          f"valid: a writable --workdir on every host")
    return path


def summarize_failure(results: list[HostResult]) -> str | None:
    """The first failing host and its last lines, or None when all succeeded."""
    bad = [r for r in results if r.exit_code not in (0, None)]
    if not bad:
        return None
    first = next((r for r in bad if r.failed_first), bad[0])
    return f"host {first.host} failed with exit code {first.exit_code}; last lines:\n" + "\n".join(f"  {l}" for l in first.tail[-10:])
