r"""Per-host command lines for torchrun and the DeepSpeed launcher, built as argument lists.

Commands are lists of arguments until the very end; the one place they become a shell string (the
remote side of SSH) goes through ``shlex.join`` so host names, paths and user arguments are quoted.

sshd runs that string as ``LOGIN_SHELL -c STRING`` with the user's login shell, which need not be POSIX: fish
reads ``\\`` and ``\'`` inside single quotes, csh/tcsh end a quoted word at a line break and expand ``!``. So
the POSIX script is never sent as is: ``login_shell_neutral`` wraps it as ``exec /bin/sh -c 'eval "$(printf
"F")"'`` where F is the script with every byte outside a small safe set written as a printf octal escape
(``\047`` for ``'``). The quoted word then holds only characters that sh, bash, dash, zsh, ksh, fish and
csh/tcsh all take literally inside single quotes, and /bin/sh rebuilds the exact script (POSIX printf).
A restricted login shell (rbash, rksh) refuses ``exec`` and command paths: such an account cannot start
torchrun anyway; the launch fails on that host with the shell's own message.
"""

from __future__ import annotations

import math
import os
import re
import secrets
import shlex
import string
from dataclasses import dataclass, field
from pathlib import Path

from meshwright.errors import invalid
from meshwright.launcher.remote.hostfile import Host

ENV_NAME_OK = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_")
RUN_ID_OK = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # a file name part and torchrun's --rdzv-id, as is


def new_run_id() -> str:
    """An id of its own for each launch: it names the hosts' --env files and the c10d rendezvous, so two launches
    sharing a work directory (or a rendezvous endpoint) never take each other's. A fixed id let one launch source,
    overwrite or remove the file of another."""
    return f"meshwright-{secrets.token_hex(6)}"


@dataclass
class LaunchSpec:
    hosts: list[Host]
    train_args: list[str]  # what follows `--`, e.g. ["train", "configs/train/default.yaml"]
    python: str = "python3"
    workdir: str = "."
    rdzv_port: int = 29400
    max_restarts: int = 0
    env: dict[str, str] = field(default_factory=dict)
    run_id: str = field(default_factory=new_run_id)  # this launch's: --env file names, --rdzv-id
    rdzv: str = "auto"  # torchrun's rendezvous: static (hostfile order), c10d (elastic restarts), auto: rdzv_backend
    # seconds torchrun gives its ranks after passing a stop signal on, before SIGKILL (None: torchrun's own, 30 s);
    # ``shutdown_timeout_for(preempt_grace_s)``, so a stop's checkpoint is not cut short
    shutdown_timeout_s: int | None = None

    def validate(self) -> None:
        if not self.train_args or self.train_args[0] != "train":
            raise invalid("command", " ".join(self.train_args) or "<empty>", "'-- train CONFIG [--plan PLAN|auto] ...'")
        if not self.hosts:
            raise invalid("hosts", [], "at least one host")
        for name, value in (("python", self.python), ("workdir", self.workdir)):
            # '' became `exec ''` / `cd ''` on every host: a failure there (or a run in $HOME), after the ssh start
            if not value.strip() or any(c in value for c in "\n\r\x00"):
                raise invalid(f"--{name}", value, "a non-empty path on the hosts, without line breaks or NUL bytes")
        if not (isinstance(self.rdzv_port, int) and 0 < self.rdzv_port < 65536):
            raise invalid("--rdzv-port", self.rdzv_port, "an integer in 1..65535")
        if not (isinstance(self.max_restarts, int) and 0 <= self.max_restarts <= MAX_RESTARTS):
            raise invalid("--max-restarts", self.max_restarts, f"an integer in 0..{MAX_RESTARTS:,}")
        if not RUN_ID_OK.fullmatch(self.run_id):
            raise invalid("run_id", self.run_id, "1-64 letters, digits, '_', '.' or '-', starting with a letter or digit")
        if self.shutdown_timeout_s is not None and not (isinstance(self.shutdown_timeout_s, int)
                                                        and 0 < self.shutdown_timeout_s < MAX_SHUTDOWN_S):
            raise invalid("shutdown_timeout_s", self.shutdown_timeout_s, "a positive whole number of seconds")
        if self.rdzv not in RDZV_CHOICES:
            raise invalid("--rdzv", self.rdzv, f"one of {', '.join(RDZV_CHOICES)}")
        if self.rdzv == "static" and self.max_restarts and len(self.hosts) > 1:
            raise invalid("--rdzv", self.rdzv, f"c10d or auto with --max-restarts {self.max_restarts} on several hosts "
                          "(a static rendezvous restarts each host's ranks alone, and the others never rejoin), or "
                          "--max-restarts 0")
        for k in self.env:
            if not k or not set(k) <= ENV_NAME_OK or k[0].isdigit():
                raise invalid("env", k, "names of letters, digits and '_' (not starting with a digit)")
        for k, v in self.env.items():
            if "\n" in v or "\r" in v or "\x00" in v:
                raise invalid("env", f"{k}={v!r}", "a value without line breaks or NUL bytes")
        if "PET_SIGNALS_TO_HANDLE" in self.env:
            check_signals_to_handle(self.env["PET_SIGNALS_TO_HANDLE"])


RDZV_CHOICES = ("auto", "static", "c10d")
# what torchrun passes on to its ranks: its default four plus Slurm's --signal choices (SIGUSR1; SIGUSR2, submitit's).
# Without them SIGUSR1 killed torchrun alone and its ranks, in sessions of their own, trained on unsupervised; with
# them, a rank stops with a checkpoint (preempt_signals) or takes the signal's default action, and torchrun follows
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1,SIGUSR2"


# torchrun's shutdown timeout: how long it waits for its ranks after passing a signal on, before SIGKILL. torch 2.13
# reads it from --shutdown-timeout, PET_SHUTDOWN_TIMEOUT or TORCH_ELASTIC_SHUTDOWN_TIMEOUT (launcher/api.py); torch 2.11
# (the GPU image's) has none of them and always waits 30 s (its PContext.close default), and refuses the flag as an
# unknown argument. The variable is the one form both take: 2.13 honours it, 2.11 ignores it (and keeps its 30 s).
SHUTDOWN_TIMEOUT_ENV = "TORCH_ELASTIC_SHUTDOWN_TIMEOUT"
TORCHRUN_SHUTDOWN_S = 30  # torchrun's default
SHUTDOWN_MARGIN_S = 15  # past preempt_grace_s: the last rank's checkpoint publish and exit after the trainer's estimate
MAX_SHUTDOWN_S = 10**6  # shutdown_timeout_s's bound (about 11.6 days)


# --max-restarts: torchrun takes any Python int (run.py: type=int, only >= 0 asserted), so 10**20 went through and meant
# "restart forever"; a crash loop ends long before this many attempts, and the count fits every int the hosts use
MAX_RESTARTS = 10_000


def check_signals_to_handle(value: str, field: str = "PET_SIGNALS_TO_HANDLE") -> None:
    """torchrun's list of signals to pass on (``--signals-to-handle`` or, with --env, ``PET_SIGNALS_TO_HANDLE``), as
    its ``PContext.start`` takes it: split at ``,``, each name stripped and looked up with ``getattr(signal, name)``. A
    name that is no signal (``SIGTERM;SIGUSR1``, ``sigterm``, ``15``, an empty item) only logs a warning on each host
    and leaves that signal unhandled (SIGUSR1 then kills torchrun alone); SIGKILL and SIGSTOP cannot be handled and
    stop torchrun with an OSError traceback. Refused here, in one line, before any host starts."""
    import signal

    names = [n.strip() for n in value.split(",")]
    for name in names:
        member = signal.Signals.__members__.get(name)
        if member is None or member in (signal.SIGKILL, signal.SIGSTOP):
            raise invalid(field, value, "a comma-separated list of catchable signal names torchrun can handle, e.g. "
                          f"{TORCHRUN_SIGNALS} (the default here); not {name!r}")


def torchrun_shutdown_honoured(python: str) -> bool | None:
    """Whether the hosts' torchrun takes ``SHUTDOWN_TIMEOUT_ENV`` as its shutdown timeout, as far as this machine can
    tell: asked of this interpreter's torch (its own ``LaunchConfig``, with the variable set) when ``python`` is this
    interpreter, else None (another interpreter's torch is not imported here, and no host is probed)."""
    import sys

    if os.path.realpath(python) != os.path.realpath(sys.executable):
        return None
    try:
        from torch.distributed.launcher.api import LaunchConfig
    except Exception:  # noqa: BLE001 - no torch here: nothing known
        return None
    if "shutdown_timeout" not in getattr(LaunchConfig, "__dataclass_fields__", {}):
        return False  # torch 2.11: no such setting, always 30 s
    saved = os.environ.get(SHUTDOWN_TIMEOUT_ENV)
    os.environ[SHUTDOWN_TIMEOUT_ENV] = "4321"
    try:
        return LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=1).shutdown_timeout == 4321
    except Exception:  # noqa: BLE001 - a LaunchConfig of another shape: unknown
        return None
    finally:
        if saved is None:
            os.environ.pop(SHUTDOWN_TIMEOUT_ENV, None)
        else:
            os.environ[SHUTDOWN_TIMEOUT_ENV] = saved


def shutdown_timeout_warning(spec: "LaunchSpec", preempt_grace_s: float, honoured: bool | None) -> str | None:
    """The one warning for a stop that needs longer than the hosts' torchrun waits: ``honoured`` False (this torch,
    the hosts' too, ignores ``SHUTDOWN_TIMEOUT_ENV``: torch 2.11 SIGKILLs the ranks 30 s after passing a signal on)
    while ``preempt_grace_s`` plus the margin exceeds those 30 s. None when it fits, is set another way (the user's
    ``PET_SHUTDOWN_TIMEOUT`` is a flag 2.11 refuses anyway), or is not known (``honoured`` None: documented)."""
    need = spec.shutdown_timeout_s
    if honoured is not False or need is None or need <= TORCHRUN_SHUTDOWN_S:
        return None
    try:
        import torch

        version = f"torch {torch.__version__}"
    except Exception:  # noqa: BLE001
        version = "this torch"
    return (f"warning: preempt_grace_s={preempt_grace_s:g} needs {need} s for a stop ({SHUTDOWN_MARGIN_S} s margin "
            f"included), but torchrun of {version} ignores {SHUTDOWN_TIMEOUT_ENV} and SIGKILLs the ranks "
            f"{TORCHRUN_SHUTDOWN_S} s after passing a stop signal on: a checkpoint still being written then is lost "
            f"(the previous one is kept); use torch >= 2.13 on the hosts, or fit the stop in {TORCHRUN_SHUTDOWN_S} s "
            f"(smaller ckpt_every steps, preempt_grace_s <= {TORCHRUN_SHUTDOWN_S - SHUTDOWN_MARGIN_S})")


def shutdown_timeout_for(preempt_grace_s: float) -> int:
    """torchrun's shutdown timeout for a run whose stop may take ``preempt_grace_s`` seconds: that plus a margin,
    never below torchrun's own 30 s (``preempt_grace_s: 0``, no check, keeps it)."""
    if not preempt_grace_s:
        return TORCHRUN_SHUTDOWN_S
    return max(TORCHRUN_SHUTDOWN_S, math.ceil(preempt_grace_s) + SHUTDOWN_MARGIN_S)


def torchrun_env(spec: LaunchSpec) -> dict[str, str]:
    """The variables the launch itself sets for each host's torchrun (not secret: they go on the command line):
    ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` from ``shutdown_timeout_s``, unless the user's --env sets it or
    ``PET_SHUTDOWN_TIMEOUT`` (torchrun's flag as a variable), which win."""
    if spec.shutdown_timeout_s is None or {SHUTDOWN_TIMEOUT_ENV, "PET_SHUTDOWN_TIMEOUT"} & set(spec.env):
        return {}
    return {SHUTDOWN_TIMEOUT_ENV: str(spec.shutdown_timeout_s)}


def rdzv_backend(spec: LaunchSpec) -> str:
    """``static`` unless elastic restarts need ``c10d`` (or the user chose). torchrun's c10d rendezvous numbers the
    nodes by address (FQDN) then pid and ignores ``--node-rank``: global rank 0, which logs and writes the
    checkpoints' metadata, and the first pipeline stages landed on whichever host sorted first. The static
    rendezvous keeps the hostfile's order (host 1 = node rank 0, its TCPStore on the first host) but cannot re-form
    the group across hosts after a restart, so ``--max-restarts`` > 0 keeps c10d."""
    if spec.rdzv != "auto":
        return spec.rdzv
    return "c10d" if spec.max_restarts > 0 else "static"


def torchrun_argv(spec: LaunchSpec, node_rank: int) -> list[str]:
    """The torchrun invocation for host ``node_rank``: its rendezvous on the first host (``rdzv_backend``), node
    ranks in hostfile order with ``static``, the preemption signals passed on to the ranks."""
    master = spec.hosts[0].name
    if rdzv_backend(spec) == "static":
        rdzv = ["--rdzv-backend=static", f"--master-addr={master}", f"--master-port={spec.rdzv_port}"]
    else:
        rdzv = ["--rdzv-backend=c10d", f"--rdzv-endpoint={master}:{spec.rdzv_port}", f"--rdzv-id={spec.run_id}"]
    # an --env PET_SIGNALS_TO_HANDLE (torchrun reads its flags from PET_* variables) is the user's choice: kept
    signals = [] if "PET_SIGNALS_TO_HANDLE" in spec.env else [f"--signals-to-handle={TORCHRUN_SIGNALS}"]
    return [
        spec.python, "-m", "torch.distributed.run",
        f"--nnodes={len(spec.hosts)}", f"--node-rank={node_rank}", f"--nproc-per-node={spec.hosts[node_rank].slots}",
        *rdzv, f"--max-restarts={spec.max_restarts}", *signals, "--tee=3",
        "-m", "meshwright.cli", *spec.train_args,
    ]


# bytes of a POSIX script written as themselves by ``login_shell_neutral``: literal inside single quotes in sh,
# fish (not \ or ') and csh/tcsh (not ! or a line break), inside sh double quotes (not $ ` " \) and in a printf
# format (not % or \); every other byte becomes a three-digit octal escape
NEUTRAL_LITERAL = frozenset((string.ascii_letters + string.digits + " ,./:=@+-_^&|;<>()[]{}~#*?").encode())


def login_shell_neutral(script: str) -> str:
    r"""The command to send over SSH so that any login shell runs POSIX ``script`` with /bin/sh: ``exec /bin/sh -c
    'eval "$(printf "F")"'``, F the script's UTF-8 bytes with each byte outside ``NEUTRAL_LITERAL`` as ``\ooo``
    (a leading ``-`` too, so printf never reads an option). Command substitution drops trailing line breaks, so
    one is never part of a script here (they end in a command)."""
    data = script.encode()
    fmt = "".join(chr(b) if b in NEUTRAL_LITERAL and not (i == 0 and b == ord("-")) else f"\\{b:03o}"
                  for i, b in enumerate(data))
    return f"exec /bin/sh -c 'eval \"$(printf \"{fmt}\")\"'"


# the first line each host's command prints: its process group id (``$$`` of the shell that then execs torchrun, a
# session leader under the pty sshd gives it), where ``signal_group_command`` sends the launch's SIGTERM/SIGUSR1
PGID_MARKER = "meshwright-launch-pgid"


def posix_remote_script(spec: LaunchSpec, argv: list[str], env_file: str | None = None) -> str:
    """The POSIX script each host runs: ``cd WORKDIR && echo PGID_MARKER $$ && exec env K=V ... ARGV`` with every
    piece quoted. With ``env_file`` (a 0600 file of ``export K='V'`` lines already on the host) the user's values stay
    off the command line: ``cd WORKDIR && . FILE && rm -f FILE && echo ... && exec [env K=V] ARGV``, where only the
    launch's own settings (``torchrun_env``) are inline. ``exec`` keeps the shell's pid (``env`` execs too), so the
    reported id is torchrun's process group."""
    report = f"echo {PGID_MARKER} $$"
    own = torchrun_env(spec)
    if env_file is not None:
        f = shlex.quote(env_file)
        inline = ["env", *(f"{k}={v}" for k, v in sorted(own.items()))] if own else []
        return f"cd {shlex.quote(spec.workdir)} && . {f} && rm -f {f} && {report} && exec {shlex.join(inline + argv)}"
    env = [f"{k}={v}" for k, v in sorted({**own, **spec.env}.items())]
    prefix = ["env", *env] if env else []
    return f"cd {shlex.quote(spec.workdir)} && {report} && exec {shlex.join(prefix + argv)}"


def parse_pgid_line(line: str) -> int | None:
    """The process group id in a host's ``PGID_MARKER`` line, or None for any other line (or a malformed one)."""
    words = line.strip().split()
    if len(words) == 2 and words[0] == PGID_MARKER and words[1].isdigit() and words[1].isascii():
        pgid = int(words[1])
        return pgid if pgid > 1 else None  # kill -- -1 would mean every process the user owns
    return None


def signal_group_command(pgid: int, signal_name: str) -> str:
    """The remote command that sends ``signal_name`` (``TERM``, ``USR1``) to process group ``pgid`` (any login
    shell). Built from an integer and a name from a fixed set, never from text a host sent."""
    if not isinstance(pgid, int) or isinstance(pgid, bool) or pgid <= 1:
        raise ValueError(f"pgid={pgid!r}: a process group id > 1")
    if signal_name not in ("TERM", "USR1", "USR2", "INT", "HUP"):
        raise ValueError(f"signal_name={signal_name!r}: TERM, USR1, USR2, INT or HUP")
    return login_shell_neutral(f"kill -s {signal_name} -- -{pgid}")


def remote_shell_command(spec: LaunchSpec, argv: list[str], env_file: str | None = None) -> str:
    """The only string sent over SSH to start a host's torchrun: ``posix_remote_script`` for any login shell."""
    return login_shell_neutral(posix_remote_script(spec, argv, env_file))


def remote_env_file(spec: LaunchSpec, node_rank: int) -> str:
    """Where a host's env file goes: under its work directory, one per host and launch (``run_id``): hosts and
    launches sharing the directory each source and remove their own."""
    return f"{spec.workdir.rstrip('/')}/.meshwright/launch-env-{spec.run_id}-{node_rank}.sh"


def upload_env_command(path: str) -> str:
    """The remote command that stores stdin as a new file only the user can read (any login shell). ``set -C``
    (noclobber): a file already there, which this launch did not write, is neither overwritten nor, the upload having
    failed, removed by this launch's clean-up."""
    parent = path.rsplit("/", 1)[0]
    return login_shell_neutral(f"umask 077 && mkdir -p {shlex.quote(parent)} && set -C && cat > {shlex.quote(path)}")


def remove_file_command(path: str) -> str:
    """The remote command that removes ``path`` (an --env file never sourced), for any login shell."""
    return login_shell_neutral(f"rm -f {shlex.quote(path)}")


def deepspeed_user_args(spec: LaunchSpec) -> list[str]:
    """The train arguments as DeepSpeed's runner must receive them. With several hosts its pdsh runner joins
    them into one remote shell line (only wrapping words with spaces in double quotes, where ``$(...)`` still
    runs), so each is single-quoted here and words with whitespace are refused. One host runs locally
    without a shell: the words go as they are."""
    if len(spec.hosts) == 1:
        return list(spec.train_args)
    for arg in spec.train_args:
        if any(c.isspace() for c in arg):
            raise invalid("command", arg, "arguments without whitespace under --launcher deepspeed with several hosts "
                          "(DeepSpeed's pdsh runner splits them); put such values in a config file or use --launcher torchrun")
    return [shlex.quote(a) for a in spec.train_args]


def check_deepspeed_workdir(spec: LaunchSpec) -> None:
    """With several hosts DeepSpeed's pdsh runner writes its working directory (our --workdir) onto the remote
    shell line as ``cd {os.path.abspath('.')};``, unquoted, and prepends it to the PYTHONPATH it exports in double
    quotes: a directory named ``w;id`` or ``$(id)`` ran on every host, and one with a space broke the ``cd``.
    Only a path that needs no shell quoting (as given and resolved, as the runner sees it) is accepted."""
    if len(spec.hosts) == 1:
        return  # DeepSpeed runs one host locally, without a shell
    for path in dict.fromkeys((os.path.abspath(spec.workdir), os.path.realpath(spec.workdir))):
        if shlex.quote(path) != path:
            raise invalid("--workdir", spec.workdir, "a directory whose absolute path needs no shell quoting "
                          "(letters, digits and @%+=:,./-_) under --launcher deepspeed with several hosts (DeepSpeed's "
                          "runner puts it unquoted on the remote command line); rename it or use --launcher torchrun")


# what stays live inside the double quotes DeepSpeed's runner wraps exported values in (and a line break ends it)
DOUBLE_QUOTE_LIVE = set('$`"\\\n\r')


def deepspeed_export_prefixes() -> list[str]:
    """The variable-name prefixes DeepSpeed's runner copies from this environment onto every host's command line
    (its ``EXPORT_ENVS`` plus the accelerator's, e.g. ``NCCL``)."""
    try:
        from deepspeed.accelerator import get_accelerator
        from deepspeed.launcher.runner import EXPORT_ENVS

        return list(EXPORT_ENVS) + list(get_accelerator().export_envs())
    except Exception:  # noqa: BLE001 - DeepSpeed 0.19.8's lists, should it fail to import here
        return ["MLFLOW", "PYTHON", "MV2", "UCX", "NCCL"]


def check_deepspeed_exports(env: dict[str, str], prefixes: list[str]) -> None:
    """DeepSpeed's runner exports this environment's ``PYTHON*``, ``NCCL*``, ... variables on the remote line as
    ``export K="V";``: ``$(...)``, backticks or quotes in a value ran (or broke the line) on every host. Refuse such
    a value in one line; ``--env`` carries it quoted in a private file instead."""
    for k, v in sorted(env.items()):
        if any(k.startswith(p) for p in prefixes) and set(v) & DOUBLE_QUOTE_LIVE:
            raise invalid("environment", f"{k}={v}", "values without $, `, \", \\ or line breaks in the variables "
                          "DeepSpeed's runner exports to every host (it puts them in double quotes on the remote command "
                          f"line); pass it as --env {k}=VALUE, unset it, or use --launcher torchrun")


def deepspeed_env_files(workdir: str, environ: dict[str, str]) -> list[str]:
    """The ``.deepspeed_env`` files DeepSpeed's runner reads with several hosts (runner.py: the name is ``DS_ENV_FILE``
    or ``.deepspeed_env``, looked up in ``~`` and then in its working directory, our --workdir), as they exist."""
    name = environ.get("DS_ENV_FILE", ".deepspeed_env")
    home = environ.get("HOME") or os.path.expanduser("~")
    paths = dict.fromkeys(os.path.join(d, name) for d in (home, workdir))
    return [p for p in paths if os.path.isfile(p)]


def check_deepspeed_env_files(paths: list[str]) -> None:
    r"""DeepSpeed's runner splits each line of a ``.deepspeed_env`` at its first ``=`` (a blank or comment line stops
    it with a ValueError traceback) and puts ``export KEY=VALUE;`` on every host's command line, the key as written
    and the value in double quotes once it holds anything but ``[\w@%+=:,./-]``, where ``$(...)``, backticks and
    ``\`` stay live. meshwright writes no such file (``--env`` goes to a sourced 0600 script); one the user keeps is
    refused in one line, naming the file and line, when a line would break that command line or run code in it."""
    for path in paths:
        try:
            with open(path, encoding="utf-8") as fh:
                lines = fh.readlines()  # as the runner reads it (text mode: \r ends a line too)
        except UnicodeDecodeError as exc:
            raise invalid(path, f"bytes at {exc.start}", "a UTF-8 text file of KEY=VALUE lines (DeepSpeed's runner "
                          "reads it as text)") from None
        for n, line in enumerate(lines, 1):
            key, sep, value = line.partition("=")
            if not sep:
                raise invalid(f"{path} line {n}", line.rstrip("\n"), "KEY=VALUE (DeepSpeed's runner splits every "
                              "line at '=': a blank or comment line stops it with a ValueError)")
            key = key.strip()
            if not key or not set(key) <= ENV_NAME_OK or key[0].isdigit():
                raise invalid(f"{path} line {n}", line.rstrip("\n"), "a KEY of letters, digits and '_' (DeepSpeed's "
                              "runner writes it unquoted into `export KEY=...;` on every host)")
            if set(value.strip()) & DOUBLE_QUOTE_LIVE:
                raise invalid(f"{path} line {n}", line.rstrip("\n"), "a value without $, `, \", \\ or line breaks "
                              "(DeepSpeed's runner puts it in double quotes on every host's command line); pass it as "
                              f"--env {key}=VALUE (sourced from a private file, quoted) or use --launcher torchrun")


def deepspeed_ssh_port(hosts: list[Host], ssh_port: int | None) -> int | None:
    """The one SSH port DeepSpeed's runner can use (it has no per-host port): --ssh-port or the hosts' common one."""
    ports = {h.port for h in hosts if h.port is not None}
    if len(ports) > 1 or (ports and ssh_port is not None and ports != {ssh_port}):
        found = sorted(ports | ({ssh_port} if ssh_port is not None else set()))
        raise invalid("port", found, "one SSH port for every host under --launcher deepspeed (its runner takes a single "
                      "--ssh_port); use --launcher torchrun for per-host ports")
    return ssh_port if ssh_port is not None else next(iter(ports), None)


def deepspeed_hostfile_text(hosts: list[Host]) -> str:
    """DeepSpeed's ``HOST slots=N`` format from the parsed hosts (``user@host`` keeps a user: pdsh -w accepts it)."""
    return "".join(f"{h.address} slots={h.slots}\n" for h in hosts)


def deepspeed_argv(spec: LaunchSpec, hostfile: str | Path, ssh_port: int | None = None, launcher: str = "pdsh",
                   env_script: str | Path | None = None) -> list[str]:
    """The single local ``deepspeed`` command; DeepSpeed's runner reaches the hosts over pdsh/ssh. ``env_script``
    (sourced on every host through ``--venv_script``) carries the user's environment, so values never appear on
    the remote command line."""
    check_deepspeed_workdir(spec)
    argv = ["deepspeed", f"--hostfile={hostfile}", f"--master_addr={spec.hosts[0].name}",
            f"--master_port={spec.rdzv_port}", f"--launcher={launcher}", f"--num_nodes={len(spec.hosts)}",
            f"--num_gpus={spec.hosts[0].slots}"]
    if ssh_port is not None:
        argv.append(f"--ssh_port={ssh_port}")
    if env_script is not None:
        argv.append(f"--venv_script={shlex.quote(str(env_script))}")
    return argv + ["--no_local_rank", "--module", "meshwright.cli", *deepspeed_user_args(spec)]


def env_script_text(spec: LaunchSpec) -> str:
    """``export KEY='VALUE'`` lines, each value quoted, for the 0600 script the remote shells source."""
    return "".join(f"export {k}={shlex.quote(v)}\n" for k, v in sorted(spec.env.items()))


def pdsh_ssh_args(ssh_key: str | None, extra: str = "") -> str:
    """``PDSH_SSH_ARGS_APPEND``: key-only, non-interactive ssh for pdsh (DeepSpeed appends ``-p PORT``), with a
    remote pty (``-tt``): when the connection closes (a Ctrl-C or SIGTERM of the launch, which stops pdsh and its
    ssh; a dropped network) sshd hangs it up and every process of the host's command gets SIGHUP, so the ranks stop
    with a checkpoint (preempt_signals). Without one nothing reached them: DeepSpeed's own remote ``pkill`` fails
    (0.19.8: 'only one pattern can be provided') and the ranks trained on, orphaned (measured)."""
    words = ["-tt", "-o", "BatchMode=yes", "-o", "PasswordAuthentication=no"]
    if ssh_key:
        words += ["-o", "IdentitiesOnly=yes", "-i", ssh_key]
    try:
        user = shlex.split(extra)
    except ValueError as exc:  # an unclosed quote was shlex's ValueError traceback, after the launch's checks
        raise invalid("PDSH_SSH_ARGS_APPEND", extra, f"ssh options that split into words ({exc}: close the quote, "
                      "or unset the variable)") from None
    return shlex.join(user + words)  # the user's words re-quoted: safe to put in a script


def dry_run_lines(spec: LaunchSpec, launcher: str, hostfile: str | Path, ssh_port: int | None = None,
                  ssh_key: str | None = None) -> list[str]:
    """Human-readable exact commands, one per host for torchrun (ssh ... 'remote command')."""
    spec.validate()
    if launcher == "deepspeed":
        pairs = shlex.join(f"{k}={v}" for k, v in sorted(spec.env.items()))
        env = [f"# every host sources these from a file only you can read (--venv_script): {pairs}"] if spec.env else []
        return env + [shlex.join(deepspeed_argv(spec, hostfile, deepspeed_ssh_port(spec.hosts, ssh_port)))]
    lines = ["# --env values go to a 0600 file on each host, sourced then removed; shown inline here"] if spec.env else []
    for i, host in enumerate(spec.hosts):
        ssh = ["ssh", "-o", "BatchMode=yes"]
        if ssh_port or host.port:
            ssh += ["-p", str(host.port or ssh_port)]
        if ssh_key:
            ssh += ["-i", ssh_key]
        lines.append(f"[{host.name}] " + shlex.join(ssh + [host.address, remote_shell_command(spec, torchrun_argv(spec, i))]))
    return lines
