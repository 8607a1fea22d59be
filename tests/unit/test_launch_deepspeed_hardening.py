"""`--launcher deepspeed` against DeepSpeed's own PDSH runner: the remote shell line it builds (simulated
here with bash, as pdsh would hand it to the remote login shell) runs nothing hidden in train arguments or
--env values, delivers every word intact, keeps env values off the command line, and the hostfile it reads
is DeepSpeed's format written from the parsed hosts."""

import shutil
import stat
import subprocess
import sys

import pytest

from meshwright.cli import main
from meshwright.commands.launch import _private_file
from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    LaunchSpec, deepspeed_argv, deepspeed_hostfile_text, deepspeed_ssh_port, env_script_text,
)
from meshwright.launcher.remote.hostfile import Host, load_hosts

# no whitespace (refused in one line, see below); each would create a pwned* file if a shell ran it
HOSTILE = ["train", "tiny-test", "out_dir=$(id>{m}1)", "--plan=`id>{m}2`", "x;id>{m}3", "it's", 'a"b',
           "data.path=$HOME", "lr=1e-3>{m}4", "steps=1&&id>{m}7"]


def remote_line(spec, tmp_path, env_script=None):
    """The command line DeepSpeed's PDSHRunner sends to every host, with its launcher swapped for a printer."""
    runner_mod = pytest.importorskip("deepspeed.launcher.runner")
    from deepspeed.launcher.multinode_runner import PDSHRunner

    argv = deepspeed_argv(spec, tmp_path / "hostfile", None, env_script=env_script)
    args = runner_mod.parse_args(argv[1:])
    cmd, _kill, _env = PDSHRunner(args, "WORLD").get_cmd({}, {h.name: [0] for h in spec.hosts})
    words = cmd[cmd.index(spec.hosts[0].name if len(spec.hosts) == 1 else ",".join(h.name for h in spec.hosts)) + 1:]
    line = " ".join(words)  # pdsh joins its arguments with spaces for the remote shell
    launcher = f"{sys.executable} -u -m deepspeed.launcher.launch"
    assert launcher in line
    return line.replace(launcher, "printf '%s\\n' \"ENV_A=$A\"")


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the simulated remote shell")
def test_hostile_train_args_and_env_reach_the_hosts_intact_and_run_nothing(tmp_path):
    marker = tmp_path / "pwned"
    train = [a.format(m=marker) for a in HOSTILE]
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=train,
                      env={"A": f"v $(touch {marker}5) `touch {marker}6` 'q'"})
    script = _private_file(tmp_path / ".meshwright", env_script_text(spec))
    line = remote_line(spec, tmp_path, env_script=script)
    assert spec.env["A"] not in line and "touch" not in line  # env values off the line
    out = subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert out.returncode == 0, out.stderr
    printed = out.stdout.splitlines()
    assert printed[0] == f"ENV_A={spec.env['A']}"  # the sourced value arrived exactly
    assert printed[printed.index("meshwright.cli") + 1:] == train  # every word exactly as typed
    assert not list(tmp_path.glob("pwned*"))  # and nothing ran


def test_without_quoting_deepspeed_would_run_them(tmp_path):
    """The simulation is sharp: DeepSpeed's runner given the raw words runs the hidden command."""
    pytest.importorskip("deepspeed.launcher.runner")
    marker = tmp_path / "pwned"
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", f"out_dir=$(id>{marker})"])
    import meshwright.launcher.remote.argv as argv_mod

    raw = argv_mod.deepspeed_user_args
    try:
        argv_mod.deepspeed_user_args = lambda s: list(s.train_args)
        line = remote_line(spec, tmp_path)
    finally:
        argv_mod.deepspeed_user_args = raw
    subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert marker.exists()


def test_whitespace_in_train_args_is_one_line_under_multi_host_deepspeed(tmp_path):
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", "data.path=/my data"])
    with pytest.raises(ConfigError) as err:
        deepspeed_argv(spec, tmp_path / "h")
    assert "\n" not in str(err.value) and "whitespace" in str(err.value)
    one = LaunchSpec(hosts=[Host("n0", 1)], train_args=["train", "data.path=/my data"])
    assert deepspeed_argv(one, tmp_path / "h")[-1] == "data.path=/my data"  # one host: no shell, no quoting


def test_env_script_is_private(tmp_path):
    path = _private_file(tmp_path / ".meshwright", "export A=1\n")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_yaml_hosts_become_a_deepspeed_hostfile(tmp_path):
    runner_mod = pytest.importorskip("deepspeed.launcher.runner")
    y = tmp_path / "hosts.yaml"
    y.write_text("hosts:\n  - {name: n0, slots: 2, user: alice, port: 2222}\n  - {name: n1, slots: 2, user: alice, port: 2222}\n")
    hosts = load_hosts(y)
    text = deepspeed_hostfile_text(hosts)
    assert text == "alice@n0 slots=2\nalice@n1 slots=2\n"
    assert dict(runner_mod._parse_hostfile(text.splitlines())) == {"alice@n0": 2, "alice@n1": 2}  # DeepSpeed reads it
    assert deepspeed_ssh_port(hosts, None) == 2222
    mixed = [Host("n0", 1, port=2222), Host("n1", 1, port=2200)]
    with pytest.raises(ConfigError, match="one SSH port"):
        deepspeed_ssh_port(mixed, None)
    with pytest.raises(ConfigError, match="one SSH port"):
        deepspeed_ssh_port(hosts, 22)


@pytest.mark.parametrize("port", ["0", "70000", "-1"])
def test_ssh_port_is_range_checked(tmp_path, capsys, port):
    hf = tmp_path / "hostfile"
    hf.write_text("n0 slots=1\n")
    assert main(["launch", "--hosts", str(hf), "--ssh-port", port, "--dry-run", "--", "train", "tiny-test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--ssh-port" in err[0]


def test_binary_hostfile_is_one_line(tmp_path):
    hf = tmp_path / "hostfile"
    hf.write_bytes(b"\x00\xffnode slots=1")
    with pytest.raises(ConfigError) as err:
        load_hosts(hf)
    assert "\n" not in str(err.value) and "binary" in str(err.value)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the simulated remote shell")
def test_deepspeed_would_run_a_hostile_workdir_so_it_is_refused(tmp_path, monkeypatch):
    """DeepSpeed's runner puts its working directory on the remote line as ``cd {os.path.abspath('.')};``,
    unquoted (and prepends it to the PYTHONPATH it exports in double quotes): a --workdir named ``w;id>pwned``
    ran ``id`` on every host. Such a directory is refused in one line before DeepSpeed starts."""
    hostile = tmp_path / "w;id>pwned"  # `cd .../w` fails, then `id>pwned` runs in the remote shell's directory
    hostile.mkdir()
    marker = tmp_path / "pwned"
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", "tiny-test"], workdir=str(hostile))
    monkeypatch.chdir(hostile)  # where run_deepspeed starts DeepSpeed's runner (cwd=--workdir)
    import meshwright.launcher.remote.argv as argv_mod

    monkeypatch.setattr(argv_mod, "check_deepspeed_workdir", lambda s: None, raising=False)
    line = remote_line(spec, tmp_path)
    subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert marker.exists()  # the simulation is sharp: unguarded, the directory name ran on the "host"
    marker.unlink()
    monkeypatch.undo()
    for workdir in (str(hostile), str(tmp_path / "my runs"), str(tmp_path / "$(id)")):
        spec.workdir = workdir
        with pytest.raises(ConfigError) as err:
            deepspeed_argv(spec, tmp_path / "hostfile")
        assert "\n" not in str(err.value) and str(err.value).startswith("--workdir=")
    assert not marker.exists()
    one = LaunchSpec(hosts=[Host("n0", 1)], train_args=["train", "tiny-test"], workdir=str(tmp_path / "my runs"))
    assert deepspeed_argv(one, tmp_path / "h")[0] == "deepspeed"  # one host: DeepSpeed runs it locally, no shell


def test_cli_dry_run_refuses_hostile_workdir_under_deepspeed(tmp_path, capsys):
    hf = tmp_path / "hostfile"
    hf.write_text("n0 slots=1\nn1 slots=1\n")
    assert main(["launch", "--hosts", str(hf), "--launcher", "deepspeed", "--workdir", "/srv/a;reboot", "--dry-run",
                 "--", "train", "tiny-test"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--workdir='/srv/a;reboot'" in err[0] and "torchrun" in err[0]


def test_cli_dry_run_refuses_the_deepspeed_env_the_launch_would(tmp_path, capsys, monkeypatch):
    """--dry-run printed the deepspeed command of a launch that then refused the user's .deepspeed_env."""
    monkeypatch.setenv("HOME", str(tmp_path))
    hf = tmp_path / "hostfile"
    hf.write_text("n0 slots=1\nn1 slots=1\n")
    argv = ["launch", "--hosts", str(hf), "--launcher", "deepspeed", "--workdir", str(tmp_path), "--dry-run", "--",
            "train", "tiny-test"]
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=$(touch /tmp/pwned)\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".deepspeed_env line 1=" in err[0] and "--env NCCL_DEBUG=VALUE" in err[0]
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n")
    assert main(argv) == 0 and "deepspeed --hostfile=" in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the simulated remote shell")
def test_environment_deepspeed_exports_cannot_run_code_on_the_hosts(tmp_path):
    """DeepSpeed's runner copies this environment's PYTHON*/NCCL*/... variables onto the remote line as
    ``export K="V";`` (double quotes: ``$(...)`` runs). Such a value is refused before DeepSpeed starts."""
    pytest.importorskip("deepspeed.launcher.runner")
    from deepspeed.launcher.multinode_runner import PDSHRunner

    import deepspeed.launcher.runner as runner_mod
    from meshwright.launcher.remote.argv import check_deepspeed_exports, deepspeed_export_prefixes

    marker = tmp_path / "pwned"
    env = {"PYTHONWARNINGS": f"ignore$(id>{marker})", "NCCL_DEBUG": "WARN", "HOME_NOTE": "$(not exported)"}
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", "tiny-test"])
    runner = PDSHRunner(runner_mod.parse_args(deepspeed_argv(spec, tmp_path / "hostfile")[1:]), "WORLD")
    for k, v in env.items():
        if any(k.startswith(p) for p in deepspeed_export_prefixes()):
            runner.add_export(k, v)  # as DeepSpeed's main() does with os.environ
    cmd, _kill, _env = runner.get_cmd({}, {"n0": [0], "n1": [0]})
    line = " ".join(cmd[cmd.index("n0,n1") + 1:]).split("cd ", 1)[0]  # the export part of the remote line
    subprocess.run(["bash", "-c", line], capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert marker.exists()  # sharp: DeepSpeed's own quoting runs it
    marker.unlink()
    with pytest.raises(ConfigError) as err:
        check_deepspeed_exports(env, deepspeed_export_prefixes())
    assert "\n" not in str(err.value) and str(err.value).startswith("environment='PYTHONWARNINGS=")
    check_deepspeed_exports({"NCCL_DEBUG": "WARN", "HOME_NOTE": "$(x)", "PYTHONPATH": "/a b:/c"}, ["PYTHON", "NCCL"])


def _two_host_deepspeed_launch(tmp_path, monkeypatch) -> tuple[list, list[str]]:
    """A two-host ``launch --launcher deepspeed`` whose runner is never started (the calls it would make are
    recorded): the argv and that record. Skips without DeepSpeed's runner, pdsh or ssh (run_deepspeed checks them)."""
    pytest.importorskip("deepspeed.launcher.runner")
    if shutil.which("pdsh") is None or shutil.which("ssh") is None:
        pytest.skip("needs pdsh and ssh on PATH (run_deepspeed checks them first)")
    import meshwright.commands.launch as launch_mod

    started: list = []
    monkeypatch.setattr(launch_mod, "_run_passing_signals_on", lambda *a, **k: started.append(a) or 0)
    hf = tmp_path / "hostfile"
    hf.write_text("n0 slots=1\nn1 slots=1\n")
    argv = ["launch", "--hosts", str(hf), "--launcher", "deepspeed", "--workdir", str(tmp_path), "--python",
            sys.executable, "--", "train", "tiny-test"]
    return started, argv


def test_cli_refuses_hostile_exported_environment_before_deepspeed_starts(tmp_path, capsys, monkeypatch):
    started, argv = _two_host_deepspeed_launch(tmp_path, monkeypatch)
    monkeypatch.setenv("PYTHONSTARTUP", "`touch /tmp/pwned`")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "PYTHONSTARTUP" in err[0] and "--env PYTHONSTARTUP=" in err[0]
    assert not started


def test_an_env_pythonpath_reaches_the_hosts_through_deepspeeds_own_export(tmp_path, monkeypatch):
    """Multi-host DeepSpeed sources the --env script and then exports PYTHONPATH=<workdir>:<the runner's PYTHONPATH>,
    which overrode `--env PYTHONPATH=...`; the runner now gets that value, so the remote line ends with it."""
    pytest.importorskip("deepspeed.launcher.runner")
    if shutil.which("pdsh") is None or shutil.which("ssh") is None:
        pytest.skip("needs pdsh and ssh on PATH (run_deepspeed checks them first)")
    import meshwright.commands.launch as launch_mod

    seen = []
    monkeypatch.setattr(launch_mod, "_run_passing_signals_on", lambda argv, **k: seen.append(k["env"]) or 0)
    monkeypatch.setenv("PYTHONPATH", "/somewhere/local")
    hf = tmp_path / "hostfile"
    hf.write_text("n0 slots=1\nn1 slots=1\n")
    assert main(["launch", "--hosts", str(hf), "--launcher", "deepspeed", "--workdir", str(tmp_path), "--python",
                 sys.executable, "--env", "PYTHONPATH=/shared/libs", "--", "train", "tiny-test"]) == 0
    assert seen and seen[0]["PYTHONPATH"] == "/shared/libs"



@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash as the simulated remote shell")
def test_a_deepspeed_env_file_cannot_run_code_on_the_hosts(tmp_path):
    """DeepSpeed's runner puts each ``.deepspeed_env`` line on the remote line as ``export KEY="VALUE";`` (runner.py
    reads ~/ and ./.deepspeed_env): a hostile value or key ran there. meshwright writes none; one found is checked."""
    pytest.importorskip("deepspeed.launcher.runner")
    from deepspeed.launcher.multinode_runner import PDSHRunner

    import deepspeed.launcher.runner as runner_mod
    from meshwright.launcher.remote.argv import check_deepspeed_env_files, deepspeed_env_files

    marker = tmp_path / "pwned"
    hostile = [f"NCCL_SOCKET_IFNAME=eth0$(id>{marker}1)\n", f"A;id>{marker}2;B=1\n", f"X=`id>{marker}3`\n"]
    spec = LaunchSpec(hosts=[Host("n0", 1), Host("n1", 1)], train_args=["train", "tiny-test"])
    for line in hostile:
        runner = PDSHRunner(runner_mod.parse_args(deepspeed_argv(spec, tmp_path / "hostfile")[1:]), "WORLD")
        key, val = line.split("=", maxsplit=1)  # runner.py main(), for each line of the file
        runner.add_export(key, val)
        cmd, _kill, _env = runner.get_cmd({}, {"n0": [0], "n1": [0]})
        subprocess.run(["bash", "-c", " ".join(cmd[cmd.index("n0,n1") + 1:]).split("cd ", 1)[0]],
                       capture_output=True, text=True, cwd=tmp_path, timeout=30)
    assert sorted(p.name for p in tmp_path.glob("pwned*")) == ["pwned1", "pwned2", "pwned3"]  # sharp

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    assert deepspeed_env_files(str(work), {"HOME": str(home)}) == []
    (home / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\nNCCL_IB_HCA=mlx5_0,mlx5_1\nPYTHONWARNINGS=ignore; it's ok\n")
    for i, line in enumerate([*hostile, "# a comment\n", "\n"]):
        (work / ".deepspeed_env").write_text(f"NCCL_DEBUG=INFO\n{line}")
        files = deepspeed_env_files(str(work), {"HOME": str(home)})
        assert files == [str(home / ".deepspeed_env"), str(work / ".deepspeed_env")]
        with pytest.raises(ConfigError) as err:
            check_deepspeed_env_files(files)
        assert "\n" not in str(err.value) and str(err.value).startswith(f"{work / '.deepspeed_env'} line 2=")
    (work / "other_env").write_bytes(b"A=\xff\n")
    files = deepspeed_env_files(str(work), {"HOME": str(home), "DS_ENV_FILE": "other_env"})
    with pytest.raises(ConfigError, match="a UTF-8 text file"):
        check_deepspeed_env_files(files)
    check_deepspeed_env_files([str(home / ".deepspeed_env")])  # plain values, and ones DeepSpeed double-quotes safely


def test_cli_refuses_a_hostile_deepspeed_env_before_deepspeed_starts(tmp_path, capsys, monkeypatch):
    started, argv = _two_host_deepspeed_launch(tmp_path, monkeypatch)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=`touch /tmp/pwned`\n")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ".deepspeed_env line 1=" in err[0] and "--env NCCL_DEBUG=VALUE" in err[0]
    assert not started
    (tmp_path / ".deepspeed_env").write_text("NCCL_DEBUG=WARN\n")
    assert main(argv) == 0 and started
