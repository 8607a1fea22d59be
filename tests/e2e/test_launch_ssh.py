"""`meshwright launch` over a real local sshd (127.0.0.1 and 127.0.0.2 as two nodes)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from meshwright.launcher.commands import LaunchSpec
from meshwright.launcher.hostfile import Host
from meshwright.launcher.ssh_runner import run_over_ssh, summarize_failure

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sshd import SSHD, start_sshd  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


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
    t0 = time.monotonic()
    results = run_over_ssh(spec, ssh_port=sshd.port, ssh_key=str(sshd.key), connect_timeout=10, sink=out)
    elapsed = time.monotonic() - t0
    assert elapsed < 45, "the healthy host was not stopped after the failure"
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


def test_cli_launch_unreachable_host_one_line(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\n")
    proc = subprocess.run([sys.executable, "-m", "meshwright.cli", "launch", "--hosts", str(hf), "--ssh-port", "9",
                           "--connect-timeout", "3", "--", "train", "default"],
                          capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "host='127.0.0.1' is unreachable over SSH" in lines[0]
