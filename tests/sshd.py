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
import time
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
    if not _port_free(port):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
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
    config.write_text("\n".join([
        f"Port {port}", "ListenAddress 127.0.0.1", "ListenAddress 127.0.0.2", f"HostKey {host_key}",
        f"PidFile {pidfile}", f"AuthorizedKeysFile {auth}", "PasswordAuthentication no",
        "KbdInteractiveAuthentication no", "PubkeyAuthentication yes", "PermitRootLogin prohibit-password",
        f"AllowUsers {getpass.getuser()}", "UsePAM no", "StrictModes no", "PermitUserEnvironment no",
        "AcceptEnv LANG LC_*", "LogLevel ERROR", "",
    ]))
    subprocess.run([SSHD, "-f", str(config), "-E", str(workdir / "sshd.log")], check=True, timeout=30)
    for _ in range(100):
        if pidfile.exists() and pidfile.read_text().strip():
            break
        time.sleep(0.05)
    known_hosts = workdir / "known_hosts"
    pub = Path(f"{host_key}.pub").read_text().split()[:2]
    known_hosts.write_text("".join(f"[{ip}]:{port} {' '.join(pub)}\n" for ip in ("127.0.0.1", "127.0.0.2")))
    return SshServer(port=port, key=client_key, pid=int(pidfile.read_text().strip()), workdir=workdir,
                     known_hosts=known_hosts)
