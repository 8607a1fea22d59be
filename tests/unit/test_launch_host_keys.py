"""SSH host keys under the torchrun launcher (fabric/paramiko): an unknown or changed host key is refused, as
OpenSSH's default does, unless the user's ssh_config says ``StrictHostKeyChecking no|accept-new``. Fabric's
``Connection`` sets paramiko's ``AutoAddPolicy`` and loads no known_hosts at all, so every key was trusted."""

import pytest

# fabric (and its paramiko) is an optional stack the GPU image lacks: skip there, instead of an ImportError at
# collection that stops the whole tests/unit run (torch_compat.sh, stop 32)
paramiko = pytest.importorskip("paramiko", reason="the launch extras (fabric, paramiko) are not installed")
Connection = pytest.importorskip("fabric", reason="the launch extras (fabric, paramiko) are not installed").Connection

from meshwright.cli import main
from meshwright.launcher.remote.hostfile import Host
from meshwright.launcher.remote.ssh import connect

KEY = paramiko.ECDSAKey.generate()


def entry(name: str) -> str:
    return f"{name} {KEY.get_name()} {KEY.get_base64()}\n"


@pytest.fixture
def opened(monkeypatch):
    """``connect`` without a network: ``Connection.open`` records the connection instead of dialing."""
    seen = []
    monkeypatch.setattr(Connection, "open", lambda self: seen.append(self))
    return seen


def test_unknown_host_keys_are_refused_not_auto_added(opened, tmp_path):
    known = tmp_path / "known_hosts"
    known.write_text(entry("[node0]:2222"))
    conn = connect(Host("node0", 1, port=2222), ssh_port=None, ssh_key=None, timeout=3, known_hosts=str(known))
    assert isinstance(conn.client._policy, paramiko.RejectPolicy)
    assert conn.client._system_host_keys.lookup("[node0]:2222") is not None  # the user's file is what is trusted


def test_system_known_hosts_are_loaded_by_default(opened, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text(entry("node1"))
    monkeypatch.setenv("HOME", str(home))
    conn = connect(Host("node1", 1), ssh_port=None, ssh_key=None, timeout=3)
    assert isinstance(conn.client._policy, paramiko.RejectPolicy)
    assert conn.client._system_host_keys.lookup("node1") is not None


@pytest.mark.parametrize("value", ["no", "accept-new"])
def test_ssh_config_can_opt_in_to_new_host_keys(opened, tmp_path, monkeypatch, value):
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "config").write_text(f"Host node2\n  StrictHostKeyChecking {value}\n")
    monkeypatch.setenv("HOME", str(home))
    conn = connect(Host("node2", 1), ssh_port=None, ssh_key=None, timeout=3)
    assert isinstance(conn.client._policy, paramiko.AutoAddPolicy)  # the user asked for it


def test_missing_known_hosts_file_is_one_line(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("node0 slots=1\n")
    assert main(["launch", "--hosts", str(hf), "--ssh-known-hosts", str(tmp_path / "nope"), "--workdir", "/w",
                 "--dry-run", "--", "train", "default"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ssh-known-hosts" in err[0]
