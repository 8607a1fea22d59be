"""torchrun's shutdown timeout follows preempt_grace_s (launcher/remote/argv.py).

On a stop signal torchrun passes it on to its ranks, then SIGKILLs them after its shutdown timeout (30 s by default),
whatever ``preempt_grace_s`` gives their checkpoint. torch 2.13 reads that timeout from ``--shutdown-timeout``,
``PET_SHUTDOWN_TIMEOUT`` or ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``; torch 2.11 (the GPU image) has none and refuses the flag.
So each host's command sets the variable (2.11 ignores it), to preempt_grace_s plus a margin, at least 30 s; the
user's own --env value wins. Checked: the command lines (quoted, with and without the --env file), what a host's
shell hands torchrun, what this torch's torchrun makes of it, and the CLI's dry run."""

from __future__ import annotations

import os
import shlex
import subprocess
from pathlib import Path

import pytest

from meshwright.cli import main
from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    SHUTDOWN_TIMEOUT_ENV, LaunchSpec, env_script_text, posix_remote_script, remote_env_file, remote_shell_command,
    shutdown_timeout_for, torchrun_argv, upload_env_command,
)
from meshwright.launcher.remote.hostfile import Host


def _spec(tmp_path: Path, env: dict[str, str] | None = None, timeout: int | None = 195) -> LaunchSpec:
    python = tmp_path / "py thon $x 'q'"  # the stand-in torchrun: prints what it got
    python.write_text(f"#!/bin/sh\nprintf 'T=%s P=%s\\n' \"${SHUTDOWN_TIMEOUT_ENV}\" \"$PET_SHUTDOWN_TIMEOUT\"\n")
    python.chmod(0o755)
    spec = LaunchSpec(hosts=[Host("node0", 2)], train_args=["train", "tiny-test"], python=str(python),
                      workdir=str(tmp_path), env=env or {}, shutdown_timeout_s=timeout)
    spec.validate()
    return spec


def _on_host(spec: LaunchSpec, cwd: Path) -> str:
    """Run host 0's command as sshd would (``sh -c``), through the --env file when there is one; its last line."""
    path = remote_env_file(spec, 0) if spec.env else None
    if path is not None:
        assert subprocess.run(["sh", "-c", upload_env_command(path)], input=env_script_text(spec), text=True,
                              cwd=cwd, timeout=30).returncode == 0
    r = subprocess.run(["sh", "-c", remote_shell_command(spec, torchrun_argv(spec, 0), path)], capture_output=True,
                       text=True, cwd=cwd, timeout=30, env={"PATH": os.environ["PATH"], "HOME": str(cwd)})
    assert r.returncode == 0, r.stderr
    return r.stdout.splitlines()[-1]


def test_timeout_is_the_grace_plus_a_margin_never_below_torchruns_30s():
    assert [shutdown_timeout_for(g) for g in (0, 1e-9, 10, 15, 30, 179.2, 180)] == [30, 30, 30, 30, 45, 195, 195]


def test_each_host_command_sets_it_inline_with_or_without_the_env_file(tmp_path):
    spec = _spec(tmp_path)
    script = posix_remote_script(spec, torchrun_argv(spec, 0))
    assert f"&& exec env {SHUTDOWN_TIMEOUT_ENV}=195 {shlex.quote(spec.python)} -m torch.distributed.run " in script
    assert _on_host(spec, tmp_path) == "T=195 P="
    secret = _spec(tmp_path, env={"A": "x $(id) 'y'"})  # user values: in the file; the launch's own: inline
    script = posix_remote_script(secret, torchrun_argv(secret, 0), remote_env_file(secret, 0))
    assert f"&& exec env {SHUTDOWN_TIMEOUT_ENV}=195 {shlex.quote(spec.python)} -m" in script and "$(id)" not in script
    assert _on_host(secret, tmp_path) == "T=195 P="


def test_the_users_env_wins_and_no_timeout_leaves_torchruns_default(tmp_path):
    mine = _spec(tmp_path, env={SHUTDOWN_TIMEOUT_ENV: "600"})
    assert posix_remote_script(mine, ["x"], remote_env_file(mine, 0)).endswith("&& exec x")
    assert _on_host(mine, tmp_path) == "T=600 P="
    flag = _spec(tmp_path, env={"PET_SHUTDOWN_TIMEOUT": "90"})  # torchrun's flag, as its variable: the flag wins there
    assert _on_host(flag, tmp_path) == "T= P=90"
    assert _on_host(_spec(tmp_path, timeout=None), tmp_path) == "T= P="
    with pytest.raises(ConfigError, match=r"^shutdown_timeout_s=0 is invalid; valid: a positive whole number"):
        _spec(tmp_path, timeout=0)


def test_this_torchrun_takes_the_variable_as_its_shutdown_timeout(monkeypatch):
    """The consumer: torch.distributed.run's own config (torch 2.13: LaunchConfig reads the variable when no flag)."""
    run = pytest.importorskip("torch.distributed.run")
    from torch.distributed.launcher.api import LaunchConfig

    if "shutdown_timeout" not in LaunchConfig.__dataclass_fields__:
        pytest.skip("this torch's torchrun has no shutdown timeout (torch 2.11: always 30 s)")
    monkeypatch.setenv(SHUTDOWN_TIMEOUT_ENV, "195")
    monkeypatch.delenv("PET_SHUTDOWN_TIMEOUT", raising=False)
    config, _, _ = run.config_from_args(run.parse_args(["--nnodes=1", "--nproc-per-node=1", "train.py"]))
    assert config.shutdown_timeout == 195


def test_launch_dry_run_takes_preempt_grace_s_from_the_config_or_its_override(tmp_path, capsys):
    hosts = tmp_path / "hostfile"
    hosts.write_text("a slots=1\n")
    assert main(["launch", "--hosts", str(hosts), "--dry-run", "--workdir", "/elsewhere", "--", "train", "x",
                 "preempt_grace_s=100"]) == 0
    assert f"{SHUTDOWN_TIMEOUT_ENV}=115 " in capsys.readouterr().out
    assert main(["launch", "--hosts", str(hosts), "--dry-run", "--workdir", "/elsewhere", "--", "train", "x"]) == 0
    assert f"{SHUTDOWN_TIMEOUT_ENV}=45 " in capsys.readouterr().out  # the config default (30 s) + the margin
    config = tmp_path / "run.yaml"  # here the hosts run in this directory: the config file itself is read
    config.write_text("model: tiny\ndata: {path: default}\npreempt_grace_s: 180\n")
    os.chdir(tmp_path)
    try:
        assert main(["launch", "--hosts", str(hosts), "--dry-run", "--", "train", str(config)]) == 0
    finally:
        os.chdir(Path(__file__).resolve().parents[2])
    assert f"{SHUTDOWN_TIMEOUT_ENV}=195 " in capsys.readouterr().out
