"""`meshwright launch`'s numeric flags, --env PET_SIGNALS_TO_HANDLE, and the shutdown-timeout warning (commands/launch.py,
launcher/remote/argv.py): each mistake is one line naming the flag before any host starts; what torchrun's own
signal parsing would only warn about per host (or crash on) is refused at launch; a stop that needs longer than the
hosts' torchrun waits (torch 2.11: 30 s, whatever TORCH_ELASTIC_SHUTDOWN_TIMEOUT says) is warned about once."""

from __future__ import annotations

import signal
import sys

import pytest

import meshwright.launcher.remote.argv as argv_mod
from meshwright.cli import main
from meshwright.errors import ConfigError
from meshwright.launcher.remote.argv import (
    MAX_RESTARTS, TORCHRUN_SIGNALS, LaunchSpec, check_signals_to_handle, shutdown_timeout_for, shutdown_timeout_warning,
    torchrun_shutdown_honoured,
)
from meshwright.launcher.remote.hostfile import Host


def _launch(tmp_path, capsys, *flags: str, train: tuple[str, ...] = ()) -> tuple[int, list[str], str]:
    hosts = tmp_path / "hostfile"
    hosts.write_text("a slots=1\nb slots=1\n")
    capsys.readouterr()
    code = main(["launch", "--hosts", str(hosts), "--dry-run", "--python", sys.executable, "--workdir", "/elsewhere",
                 *flags, "--", "train", "x", *train])
    out = capsys.readouterr()
    return code, out.err.strip().splitlines(), out.out


@pytest.mark.parametrize("flags, line", [
    (["--max-restarts", "100000000000000000000"], "--max-restarts=100000000000000000000 is invalid; valid: an integer "
                                                  f"in 0..{MAX_RESTARTS:,}"),
    (["--max-restarts", "-1"], "--max-restarts=-1 is invalid; valid: an integer in 0..10,000"),
    (["--rdzv-port", "0"], "--rdzv-port=0 is invalid; valid: an integer in 1..65535"),
    (["--rdzv-port", "65536"], "--rdzv-port=65536 is invalid; valid: an integer in 1..65535"),
    (["--ssh-port", "99999"], "--ssh-port=99999 is invalid; valid: an integer in 1..65535"),
    (["--connect-timeout", "1e12"], "--connect-timeout=1000000000000.0 is invalid; valid: a positive number of "
                                    "seconds, at most 3600"),
    (["--connect-timeout", "nan"], "--connect-timeout=nan is invalid"),
    (["--env", "PET_SIGNALS_TO_HANDLE=SIGTERM;SIGUSR1"], "PET_SIGNALS_TO_HANDLE='SIGTERM;SIGUSR1' is invalid; valid: "
                                                         "a comma-separated list of catchable signal names"),
])
def test_each_bad_flag_is_one_line_naming_it(tmp_path, capsys, flags, line):
    code, err, out = _launch(tmp_path, capsys, *flags)
    assert code == 2 and len(err) == 1 and line in err[0] and out == ""


def test_the_bounds_themselves_are_accepted(tmp_path, capsys):
    code, err, out = _launch(tmp_path, capsys, "--max-restarts", str(MAX_RESTARTS), "--rdzv-port", "65535",
                             "--connect-timeout", "3600", "--env", "PET_SIGNALS_TO_HANDLE= SIGTERM , SIGUSR1")
    assert code == 0 and f"--max-restarts={MAX_RESTARTS}" in out and "--master-port" not in out  # restarts: c10d
    assert "--rdzv-endpoint=a:65535" in out


def test_a_grace_too_long_for_torchruns_timeout_is_named_as_preempt_grace_s(tmp_path, capsys):
    code, err, _ = _launch(tmp_path, capsys, train=("preempt_grace_s=1e7",))
    assert code == 2 and len(err) == 1 and err[0].endswith(
        "preempt_grace_s=10000000.0 is invalid; valid: less than 999,985 seconds under meshwright launch (torchrun "
        "waits that plus 15 s for the ranks after a stop signal)")


def _torchrun_takes(value: str) -> bool:
    """The consumer, as torch's PContext.start parses TORCHELASTIC_SIGNALS_TO_HANDLE (which torchrun sets from
    --signals-to-handle / PET_SIGNALS_TO_HANDLE): every name found in `signal` and registrable, else a warning per
    name (AttributeError, ValueError) or a traceback (OSError for SIGKILL/SIGSTOP, TypeError)."""
    for name in value.split(","):
        try:
            sig = getattr(signal, name.strip())
            old = signal.signal(sig, signal.getsignal(sig))
            signal.signal(sig, old)
        except (AttributeError, ValueError, OSError, TypeError):
            return False
    return True


# names torchrun's getattr finds that are no signal names, but numbers that happen to be one (SIG_IGN = 1 registers
# SIGHUP, SIG_SETMASK and ITIMER_PROF = 2 SIGINT): a mistake, refused although torchrun would take them
NOT_SIGNAL_NAMES = ("SIG_IGN", "SIG_SETMASK", "ITIMER_PROF")


@pytest.mark.parametrize("value", [TORCHRUN_SIGNALS, "SIGTERM", " SIGUSR1 ,SIGUSR2", "SIGTERM,SIGTERM", "SIGRTMIN",
                                   "", "SIGTERM,", "sigterm", "15", "TERM", "SIGTERM;SIGINT", "SIGKILL", "SIGSTOP",
                                   "SIG_DFL", "NSIG", "signal", "SIGTERM SIGINT", *NOT_SIGNAL_NAMES])
def test_signal_lists_are_refused_where_torchrun_would_not_take_them(value):
    if _torchrun_takes(value) and value not in NOT_SIGNAL_NAMES:
        check_signals_to_handle(value)
    else:
        with pytest.raises(ConfigError, match=r"^PET_SIGNALS_TO_HANDLE=.* is invalid; valid: a comma-separated"):
            check_signals_to_handle(value)
    assert _torchrun_takes(value) == (value in (TORCHRUN_SIGNALS, "SIGTERM", " SIGUSR1 ,SIGUSR2", "SIGTERM,SIGTERM",
                                                "SIGRTMIN", *NOT_SIGNAL_NAMES))  # the stand-in consumer itself


def test_the_shutdown_warning_follows_what_the_hosts_torchrun_honours(tmp_path, capsys, monkeypatch):
    spec = LaunchSpec(hosts=[Host("a", 1)], train_args=["train", "x"], shutdown_timeout_s=shutdown_timeout_for(100))
    warning = shutdown_timeout_warning(spec, 100, honoured=False)
    assert warning.startswith("warning: preempt_grace_s=100 needs 115 s for a stop (15 s margin included), but "
                              "torchrun of torch ") and "SIGKILLs the ranks 30 s after" in warning
    assert shutdown_timeout_warning(spec, 100, honoured=True) is None
    assert shutdown_timeout_warning(spec, 100, honoured=None) is None  # not knowable here: documented, not guessed
    short = LaunchSpec(hosts=[Host("a", 1)], train_args=["train", "x"], shutdown_timeout_s=shutdown_timeout_for(15))
    assert shutdown_timeout_warning(short, 15, honoured=False) is None  # fits torchrun's 30 s
    # this torch (2.13) takes the variable: asked of its own LaunchConfig; another interpreter is not asked
    assert torchrun_shutdown_honoured(sys.executable) is True
    assert torchrun_shutdown_honoured(str(tmp_path / "other-python")) is None
    # the CLI warns once, on stderr, and still launches (a dry run here); torch 2.11's torchrun stood in for
    monkeypatch.setattr(argv_mod, "torchrun_shutdown_honoured", lambda python: False)
    code, err, out = _launch(tmp_path, capsys, train=("preempt_grace_s=100",))
    assert code == 0 and len(err) == 1 and err[0].startswith("meshwright launch: warning: preempt_grace_s=100 needs")
    assert _launch(tmp_path, capsys, train=("preempt_grace_s=10",))[1] == []
    assert _launch(tmp_path, capsys, "--launcher", "deepspeed", train=("preempt_grace_s=100",))[1] == []
