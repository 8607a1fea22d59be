"""A real, throw-away SSH server for launch tests: sshd on 127.0.0.1 and 127.0.0.2, key-only auth.

Started on a free port (2222 by default when free) with a generated host key and a generated client
key authorised for the current user; stopped by its pid afterwards. Two "nodes" = the two loopback
addresses. Needs Debian's openssh-server (installed by .ci/run).
"""

from __future__ import annotations

import getpass
import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)


@dataclass
class SshServer:
    port: int
    key: Path
    pid: int
    workdir: Path
    known_hosts: Path  # its host key for both loopback "nodes": launches verify it as they would a real host's

    def stop(self) -> None:
        try:
            os.kill(self.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def start_sshd(workdir: Path, port: int = 2222) -> SshServer:
    if SSHD is None:
        raise RuntimeError("sshd not installed (apt-get install openssh-server)")
    workdir.mkdir(parents=True, exist_ok=True)
    host_key, client_key = workdir / "host_ed25519", workdir / "client_ed25519"
    for key in (host_key, client_key):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)], check=True, timeout=30)
    auth = workdir / "authorized_keys"
    auth.write_text(Path(f"{client_key}.pub").read_text())
    auth.chmod(0o600)
    Path("/run/sshd").mkdir(exist_ok=True)  # privilege-separation dir sshd insists on
    pidfile = workdir / "sshd.pid"
    config = workdir / "sshd_config"
    log = workdir / "sshd.log"
    # the port is free when checked, then bound by sshd: another session's sshd or test may take it in between
    # (2222 is every session's first choice). sshd then says "Address already in use" (and exits, or listens on the
    # other address only): stop it and start again on another port
    for attempt in range(3):
        if attempt or not _port_free(port):
            from helpers import free_port

            port = free_port()
        config.write_text("\n".join([
            f"Port {port}", "ListenAddress 127.0.0.1", "ListenAddress 127.0.0.2", f"HostKey {host_key}",
            f"PidFile {pidfile}", f"AuthorizedKeysFile {auth}", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
            f"AllowUsers {getpass.getuser()}", "UsePAM no", "StrictModes no", "PermitUserEnvironment no",
            "AcceptEnv LANG LC_*", "LogLevel ERROR", "",
        ]))
        pidfile.unlink(missing_ok=True)
        log.write_text("")
        started = subprocess.run([SSHD, "-f", str(config), "-E", str(log)], capture_output=True, text=True,
                                 timeout=120)
        in_use = "already in use" in log.read_text() + started.stderr
        if started.returncode == 0:
            from patience import until

            until(lambda: pidfile.exists() and pidfile.read_text().strip() != "", 5)  # sshd writes it as it forks
            if not in_use:
                break
            os.kill(int(pidfile.read_text().strip()), signal.SIGTERM)
        elif not in_use:
            raise RuntimeError(f"sshd failed to start (rc={started.returncode}): {started.stderr}{log.read_text()}")
    else:
        raise RuntimeError(f"sshd: no free port in 3 tries (last {port}): {log.read_text()}")
    known_hosts = workdir / "known_hosts"
    pub = Path(f"{host_key}.pub").read_text().split()[:2]
    known_hosts.write_text("".join(f"[{ip}]:{port} {' '.join(pub)}\n" for ip in ("127.0.0.1", "127.0.0.2")))
    return SshServer(port=port, key=client_key, pid=int(pidfile.read_text().strip()), workdir=workdir,
                     known_hosts=known_hosts)
