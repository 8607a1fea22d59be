"""tests/helpers.py run_torchrun: a failed launch reports the failing rank's own traceback whole (the old helper kept
the last 6,000 characters of torchrun's merged stderr, which cut a rank's traceback under other ranks' output), every
rank's log is kept in files, a passing launch returns each rank's output, a timed-out launch leaves no rank running.

The ranks here are plain Python scripts (no torch import): each launch costs torchrun's own startup only."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from helpers import PYTHON, REPO, children, ended, kill_launch, rank_logs, run_torchrun
from patience import Patience, wait

NOISE = "".join(f"rank 1 warning line {i}: " + "w" * 60 + "\n" for i in range(400))  # ~30,000 characters

FAILING = f'''
import os, sys, time
from pathlib import Path
started = Path(__file__).with_name("rank0.started")
rank = int(os.environ["RANK"])
if rank == 0:
    print("rank 0 started", flush=True)
    started.write_text("")
    time.sleep(120)  # killed by torchrun once rank 1 fails
# rank 1 fails only once rank 0 has printed: on a busy box rank 1 could fail (and torchrun kill rank 0) first
deadline = time.monotonic() + 120
while not started.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
sys.stderr.write({NOISE!r})
sys.stderr.flush()

def first_frame_of_rank_one():
    second_frame()

def second_frame():
    raise RuntimeError("rank one broke: " + "m" * 8000 + " END-OF-MESSAGE")

first_frame_of_rank_one()
'''

PASSING = '''
import os, sys
rank = os.environ["RANK"]
for i in range(3):
    print(f"hello from rank {rank} line {i}")
print(f"rank {rank} to stderr", file=sys.stderr)
'''

SLEEPING = '''
import os, sys, time
from pathlib import Path
Path(sys.argv[1], "pid." + os.environ["RANK"]).write_text(str(os.getpid()))
time.sleep(600)
'''


def _script(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _gone(pid: int, within: float = 30) -> bool:
    """Whether ``pid`` has ended within ``within`` s of quiet-box time (a bound, not pacing: tests/patience.py)."""
    return Patience(within).until(lambda: ended(pid), poll=0.1)


@pytest.mark.timeout(300)
def test_a_failed_launch_reports_the_failing_ranks_traceback_whole(tmp_path):
    logs = tmp_path / "logs"
    with pytest.raises(AssertionError) as exc:
        run_torchrun(_script(tmp_path, "failing.py", FAILING), 2, timeout=240, log_dir=logs)
    msg = str(exc.value)
    assert "failed (rc=1)" in msg and str(logs) in msg, msg[:2000]
    assert "local rank 1 (torchrun's root cause): stderr, whole" in msg, msg[:2000]
    # the traceback from its first line to the end of the message, after 30,000 characters of the rank's noise
    tb = msg.index("Traceback (most recent call last)")
    assert msg.index("in first_frame_of_rank_one", tb) < msg.index("in second_frame", tb) < msg.index(
        "m" * 8000 + " END-OF-MESSAGE", tb), msg[tb - 200:tb + 2000]
    # every rank's own log is kept in full
    kept = rank_logs(logs)
    assert sorted(kept) == [0, 1]
    assert "rank 0 started" in kept[0]["stdout"]
    assert NOISE in kept[1]["stderr"] and "END-OF-MESSAGE" in kept[1]["stderr"]


@pytest.mark.timeout(300)
def test_a_passing_launch_returns_every_ranks_output_and_leaves_no_logs(tmp_path, tmp_path_factory):
    before = set(tmp_path_factory.getbasetemp().iterdir())
    proc = run_torchrun(_script(tmp_path, "passing.py", PASSING), 2, timeout=240)
    lines = proc.stdout.splitlines()
    for rank in (0, 1):
        assert [x for x in lines if x.startswith(f"hello from rank {rank} ")] == [
            f"hello from rank {rank} line {i}" for i in range(3)], proc.stdout
        assert f"rank {rank} to stderr" in proc.stderr
    assert set(tmp_path_factory.getbasetemp().iterdir()) == before  # its log directory was removed


@pytest.mark.timeout(300)
def test_killing_a_launch_dumps_and_ends_its_ranks(tmp_path):
    """kill_launch (run_torchrun's timeout path) ends the ranks too: they run in sessions of their own, so killing
    torchrun alone (what subprocess.run's timeout did) left them running on the box. First each rank writes its
    Python stack to its log (where a hung launch hung)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "PYTHONFAULTHANDLER": "1"}
    env.pop("TORCHELASTIC_RUN_ID", None)
    logs = tmp_path / "logs"
    proc = subprocess.Popen([PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                             f"--log-dir={logs}", "--redirects=3", str(_script(tmp_path, "sleeping.py", SLEEPING)),
                             str(tmp_path)], env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        patience = Patience(240)
        while len(list(tmp_path.glob("pid.*"))) < 2:
            assert proc.poll() is None and not patience.expired(), "the ranks never started"
            time.sleep(0.1)
        pids = [int(p.read_text()) for p in tmp_path.glob("pid.*")]
        assert sorted(children(proc.pid)) == sorted(pids)
        kill_launch(proc, dump_stacks=True)
        wait(proc, 30)
        assert all(_gone(pid) for pid in pids), pids
        for rank, v in rank_logs(logs).items():
            assert "(most recent call first)" in v["stderr"] and 'sleeping.py", line 5' in v["stderr"], (rank, v)
    finally:
        if proc.poll() is None:
            kill_launch(proc)
            proc.wait(30)


@pytest.mark.timeout(300)
def test_a_timed_out_launch_says_so_and_leaves_no_rank(tmp_path):
    with pytest.raises(AssertionError, match=r"timed out after 8 s \(ranks killed"):
        run_torchrun(_script(tmp_path, "sleeping.py", SLEEPING), 2, [str(tmp_path)], timeout=8)
    assert all(_gone(int(p.read_text())) for p in tmp_path.glob("pid.*"))  # those that started in 8 s
