"""The commands sent over SSH run the same under any login shell: sshd runs each as ``LOGIN_SHELL -c COMMAND``,
so every shell found here (sh, bash, dash, zsh, ksh, fish, tcsh, csh; absent ones are skipped) runs them that way
with hostile paths, arguments and --env values, and the quoted word is checked against fish's and csh's quoting
rules, which no shell installed here may exercise."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from meshwright.launcher.remote.argv import (
    LaunchSpec, env_script_text, login_shell_neutral, remote_env_file, remote_shell_command, remove_file_command,
    signal_group_command,
    torchrun_argv, upload_env_command,
)
from meshwright.launcher.remote.hostfile import Host

SHELLS = ("sh", "bash", "dash", "zsh", "ksh", "mksh", "fish", "tcsh", "csh")
# what a hostile word may hold: spaces, both quotes, $, backticks, !, history and glob characters, %, backslashes
HOSTILE = "a b 'q' \"d\" $HOME $(touch {m}) `touch {m}` !! !$ \\ \\\\ \\' %s %% * ~ # é"


def _shell(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} not installed here")
    return path


def _run(shell: str, command: str, stdin: str = "", cwd: Path | None = None) -> subprocess.CompletedProcess:
    """As sshd does: the login shell with -c and the command string, in the home directory, no terminal."""
    return subprocess.run([shell, "-c", command], input=stdin, capture_output=True, text=True, timeout=30,
                          cwd=cwd, env={"PATH": os.environ["PATH"], "HOME": str(cwd or "/")})


def _fish_and_csh_read_it_as_sh(command: str) -> None:
    """What makes fish and csh/tcsh read a command otherwise than sh: ! (csh history), a line break (csh ends a
    quoted word there), a backslash in single quotes (fish reads \\\\ and \\' there). Allowed: the printf escapes."""
    assert not set(command) & set("!\n\r"), command
    assert re.fullmatch(r"(?:[^\\]|\\[0-7]{3})*", command), command


def _hostile_host(tmp_path: Path) -> tuple[LaunchSpec, Path, Path]:
    """A spec whose work directory, python path, train arguments and --env value are all hostile; the "python"
    records its arguments (NUL-separated), working directory and $A."""
    marker = tmp_path / "pwned"
    word = HOSTILE.format(m=marker)
    workdir = tmp_path / f"work {word.replace('/', '_')}"
    workdir.mkdir()
    bindir = tmp_path / "bin $x `y` 'z' !1"
    bindir.mkdir()
    python = bindir / "py thon"
    out = tmp_path / "seen"
    python.write_text(f"#!/bin/sh\nprintf '%s\\0' \"$@\" > '{out}'\npwd >> '{out}.cwd'\n"
                      f"printf '%s' \"$A\" > '{out}.env'\n")
    python.chmod(0o755)
    spec = LaunchSpec(hosts=[Host("node0", 2), Host("node1", 2)], python=str(python), workdir=str(workdir),
                      train_args=["train", word, f"out_dir={word}", "line\nbreak", "-", "--x=%d"], env={"A": word})
    spec.validate()
    return spec, out, marker


@pytest.mark.parametrize("name", SHELLS)
def test_the_remote_commands_run_the_same_under_every_login_shell(name, tmp_path):
    shell = _shell(name)
    spec, out, marker = _hostile_host(tmp_path)
    argv = torchrun_argv(spec, 1)

    path = remote_env_file(spec, 1)
    for command in (remote_shell_command(spec, argv), remote_shell_command(spec, argv, path),
                    upload_env_command(path), remove_file_command(path), signal_group_command(4242, "TERM")):
        _fish_and_csh_read_it_as_sh(command)

    # without --env file: env A=... in the command
    r = _run(shell, remote_shell_command(spec, argv), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().decode().split("\0")[:-1] == argv[1:]
    assert Path(out.with_suffix(".cwd").read_text().strip()) == Path(spec.workdir)
    assert out.with_suffix(".env").read_text() == spec.env["A"]

    # with the --env file: stored from stdin (0600), sourced, removed
    for f in (out, out.with_suffix(".cwd"), out.with_suffix(".env")):
        f.unlink()
    r = _run(shell, upload_env_command(path), stdin=env_script_text(spec), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (os.stat(path).st_mode & 0o777) == 0o600
    r = _run(shell, remote_shell_command(spec, argv, path), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes().decode().split("\0")[:-1] == argv[1:]
    assert out.with_suffix(".env").read_text() == spec.env["A"] and not os.path.exists(path)

    # the clean-up command for a file never sourced
    Path(path).write_text("x")
    assert _run(shell, remove_file_command(path), cwd=tmp_path).returncode == 0 and not os.path.exists(path)
    assert not marker.exists()  # nothing hidden in a word ran


def test_the_inner_shell_may_be_dash_or_bash(tmp_path):
    """/bin/sh is dash on Debian, bash on RHEL: both rebuild the same script from the printf escapes."""
    spec, out, marker = _hostile_host(tmp_path)
    argv = torchrun_argv(spec, 0)
    for inner in ("dash", "bash"):
        path = _shell(inner)
        command = remote_shell_command(spec, argv).replace("exec /bin/sh -c", f"exec {path} -c", 1)
        r = _run(_shell("sh"), command, cwd=tmp_path)
        assert r.returncode == 0, (inner, r.stderr)
        assert out.read_bytes().decode().split("\0")[:-1] == argv[1:], inner
        out.unlink()
    assert not marker.exists()


@pytest.mark.parametrize("script", ["cd /w && exec python3 -m x", "-n", "printf '%s\\n' \"$A\" `id` !x\n\\'\\\\",
                                    "é ü 中 \t\r"])
def test_the_quoted_word_keeps_to_what_every_login_shell_reads_literally(script):
    """The one argument of ``exec /bin/sh -c '...'``: no single quote (ends it in every shell), no backslash
    followed by a backslash or quote (fish reads \\\\ and \\' inside single quotes), no ! or line break (csh/tcsh
    history substitution; a quoted line break is csh's "Unmatched '."), no other backslash than a three-digit octal
    printf escape, and the escapes spell the script."""
    command = login_shell_neutral(script)
    m = re.fullmatch(r"exec /bin/sh -c '(eval \"\$\(printf \"(.*)\"\)\")'", command, re.S)
    assert m, command
    word, fmt = m.groups()
    assert not set(word) & set("'!\n\r\t") and word.isascii()
    assert re.fullmatch(r"(?:[^\\%$`\"]|\\[0-7]{3})*", fmt) and not fmt.startswith("-")
    assert re.sub(rb"\\([0-7]{3})", lambda e: bytes([int(e.group(1), 8)]), fmt.encode()) == script.encode()


def test_a_restricted_login_shell_fails_on_the_host_not_silently(tmp_path):
    """rbash refuses exec and command paths: the host exits non-zero with rbash's own message (the launcher then
    reports that host's last lines), nothing runs."""
    shell = _shell("rbash")
    spec, out, marker = _hostile_host(tmp_path)
    r = _run(shell, remote_shell_command(spec, torchrun_argv(spec, 0)), cwd=tmp_path)
    assert r.returncode != 0 and "restricted" in r.stderr
    assert not out.exists() and not marker.exists()
