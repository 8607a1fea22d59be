"""`meshwright launch`: start a training run on many hosts with torchrun (over SSH) or deepspeed."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "launch", help="launch `meshwright train` on many hosts (torchrun over SSH, or the deepspeed launcher)",
        description="Example: meshwright launch --hosts hostfile --launcher torchrun -- train configs/train/default.yaml --plan auto",
    )
    p.add_argument("--hosts", required=True, help="DeepSpeed-style hostfile ('HOST slots=N' lines) or a YAML with hosts: [{name, slots}]")
    p.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    p.add_argument("--ssh-port", type=int, default=None, help="SSH port of every host (default 22 or the hostfile's)")
    p.add_argument("--ssh-key", default=None, help="private key file; SSH is key-only")
    p.add_argument("--rdzv-port", type=int, default=29400, help="c10d rendezvous / master port on the first host")
    p.add_argument("--max-restarts", type=int, default=0, help="elastic restarts; the trainer resumes from the latest checkpoint")
    p.add_argument("--python", default=sys.executable, help="python on the hosts (default: this interpreter's path)")
    p.add_argument("--workdir", default=os.getcwd(), help="directory on the hosts to run in (default: this one)")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment to set on every host (repeatable)")
    p.add_argument("--connect-timeout", type=float, default=10.0)
    p.add_argument("--dry-run", action="store_true", help="print the exact per-host commands and exit")
    p.add_argument("train_command", nargs=argparse.REMAINDER, help="-- train CONFIG [--plan PLAN|auto] [key=value ...]")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from meshwright.errors import invalid
    from meshwright.launcher.remote.argv import LaunchSpec, dry_run_lines
    from meshwright.launcher.remote.hostfile import load_hosts
    from meshwright.launcher.remote.ssh import run_over_ssh, summarize_failure

    command = args.train_command[1:] if args.train_command[:1] == ["--"] else args.train_command
    env = {}
    for item in args.env:
        if "=" not in item:
            raise invalid("env", item, "KEY=VALUE")
        k, v = item.split("=", 1)
        env[k] = v
    spec = LaunchSpec(hosts=load_hosts(args.hosts), train_args=command, python=args.python, workdir=args.workdir,
                      rdzv_port=args.rdzv_port, max_restarts=args.max_restarts, env=env)
    spec.validate()
    if args.dry_run:
        for line in dry_run_lines(spec, args.launcher, args.hosts, args.ssh_port, args.ssh_key):
            print(line)
        return 0
    if args.launcher == "deepspeed":
        return run_deepspeed(spec, args)
    results = run_over_ssh(spec, args.ssh_port, args.ssh_key, args.connect_timeout)
    message = summarize_failure(results)
    if message:
        print(f"meshwright launch: {message}", file=sys.stderr)
        return 1
    return 0


def run_deepspeed(spec, args: argparse.Namespace) -> int:
    """Run DeepSpeed's own multi-node runner (pdsh over ssh) locally; it reaches every host itself.

    The user's ``--env`` travels in a ``DS_ENV_FILE`` (the runner exports it on every host), and the SSH
    key goes to pdsh's ssh through ``PDSH_SSH_ARGS_APPEND`` (DeepSpeed appends ``-p PORT`` to it).
    """
    import shlex
    import shutil
    import tempfile
    from pathlib import Path

    from meshwright.errors import invalid
    from meshwright.launcher.remote.argv import deepspeed_argv, deepspeed_env_file_text, pdsh_ssh_args

    argv = deepspeed_argv(spec, Path(args.hosts).resolve(), args.ssh_port)
    beside = Path(args.python).parent / "deepspeed"
    exe = str(beside) if beside.is_file() else shutil.which("deepspeed")
    if exe is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install deepspeed so its `deepspeed` command is on PATH")
    if shutil.which("pdsh") is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install pdsh (DeepSpeed's multi-node runner uses it)")
    real_ssh = shutil.which("ssh")
    if real_ssh is None:
        raise invalid("launcher", "deepspeed", "torchrun, or install an ssh client (openssh-client)")
    argv[0] = exe
    run_env = {**os.environ, "PDSH_RCMD_TYPE": "ssh"}
    with tempfile.TemporaryDirectory(prefix="meshwright-ds-") as tmp:
        # DeepSpeed's reachability probe runs a bare `ssh HOST hostname` and pdsh execs `ssh` from PATH:
        # a wrapper first on PATH gives both the key and the user's PDSH_SSH_ARGS_APPEND options.
        opts = pdsh_ssh_args(args.ssh_key, os.environ.get("PDSH_SSH_ARGS_APPEND", ""))
        wrapper = Path(tmp) / "ssh"
        wrapper.write_text(f"#!/bin/sh\nexec {shlex.quote(real_ssh)} {opts} \"$@\"\n")
        wrapper.chmod(0o700)
        run_env["PATH"] = f"{tmp}{os.pathsep}{os.environ.get('PATH', '')}"
        if spec.env:
            env_file = Path(tmp) / "deepspeed_env"
            env_file.write_text(deepspeed_env_file_text(spec))
            run_env["DS_ENV_FILE"] = str(env_file)
        return subprocess.call(argv, cwd=spec.workdir, env=run_env)
