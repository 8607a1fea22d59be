"""Two launches sharing a work directory each store, source and remove their own --env file (argv.remote_env_file):
the file is named by the launch's own id (``LaunchSpec.run_id``, one per launch), and the upload never overwrites a
file that is already there. A fixed id made one launch's host source the other's values or its clean-up remove the
other's file. The commands run as sshd runs them (``sh -c COMMAND``), with a stand-in python that prints $A."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    LaunchSpec, env_script_text, remote_env_file, remote_shell_command, remove_file_command, torchrun_argv,
    upload_env_command,
)
from meshwright.launcher.remote.hostfile import Host


def _sh(command: str, cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", command], input=stdin, capture_output=True, text=True, timeout=30, cwd=cwd,
                          env={"PATH": os.environ["PATH"], "HOME": str(cwd)})


def _launch(tmp_path: Path, value: str, **kw) -> LaunchSpec:
    python = tmp_path / "python"
    python.write_text("#!/bin/sh\nprintf 'A=%s\\n' \"$A\"\n")
    python.chmod(0o755)
    spec = LaunchSpec(hosts=[Host("node0", 1)], train_args=["train", "tiny-test"], python=str(python),
                      workdir=str(tmp_path), env={"A": value}, **kw)
    spec.validate()
    return spec


def _upload(spec: LaunchSpec, cwd: Path) -> subprocess.CompletedProcess:
    return _sh(upload_env_command(remote_env_file(spec, 0)), cwd, stdin=env_script_text(spec))


def test_two_launches_in_one_directory_each_source_and_remove_their_own_file(tmp_path):
    a, b = _launch(tmp_path, "from a"), _launch(tmp_path, "from b")
    assert a.run_id != b.run_id and remote_env_file(a, 0) != remote_env_file(b, 0)
    for spec in (a, b):  # both stored before either host starts (run_over_ssh uploads to every host first)
        assert _upload(spec, tmp_path).returncode == 0
    files = sorted((tmp_path / ".meshwright").iterdir())
    assert [f.name for f in files] == sorted(f"launch-env-{s.run_id}-0.sh" for s in (a, b))

    r = _sh(remote_shell_command(a, torchrun_argv(a, 0), remote_env_file(a, 0)), tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "A=from a", r.stderr
    assert not os.path.exists(remote_env_file(a, 0)) and os.path.exists(remote_env_file(b, 0))
    # a's clean-up of a file it never sourced touches only its own name
    assert _sh(remove_file_command(remote_env_file(a, 0)), tmp_path).returncode == 0
    assert Path(remote_env_file(b, 0)).read_text() == env_script_text(b)

    r = _sh(remote_shell_command(b, torchrun_argv(b, 0), remote_env_file(b, 0)), tmp_path)
    assert r.returncode == 0 and r.stdout.splitlines()[-1] == "A=from b", r.stderr
    assert not list((tmp_path / ".meshwright").iterdir())


def test_an_upload_never_overwrites_a_file_it_did_not_write(tmp_path):
    """Two launches given the same id (by hand): the second upload fails and the first launch's file is intact."""
    a, b = _launch(tmp_path, "from a", run_id="same"), _launch(tmp_path, "from b", run_id="same")
    assert _upload(a, tmp_path).returncode == 0
    r = _upload(b, tmp_path)
    assert r.returncode != 0 and r.stderr.strip()
    assert Path(remote_env_file(a, 0)).read_text() == env_script_text(a)
    assert os.stat(remote_env_file(a, 0)).st_mode & 0o777 == 0o600


def test_the_run_id_names_the_rendezvous_too_and_is_checked():
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", "x"], max_restarts=1)
    assert f"--rdzv-id={spec.run_id}" in torchrun_argv(spec, 1)
    assert spec.run_id.startswith("meshwright-") and remote_env_file(spec, 1).endswith(f"-{spec.run_id}-1.sh")
    for bad in ("", "../x", "a b", "-x", "x" * 65):
        with pytest.raises(ConfigError, match=r"^run_id=.* is invalid; valid: 1-64 letters"):
            LaunchSpec(hosts=[Host("n0", 1)], train_args=["train", "x"], run_id=bad).validate()
