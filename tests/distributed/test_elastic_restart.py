"""Elastic restart: SIGKILL one rank mid-run under torchrun --max-restarts 1; the run resumes from the
latest complete checkpoint and its loss trajectory equals an uninterrupted run's, step for step.

The waits are bounds, not pacing (each returns as soon as its event happens): on a box loaded far past its cores
(load average ~100 on 2 cores, seen) the restarted ranks took 2 minutes to start and load the checkpoint, and the
150 s once allowed for the restart and its 20 steps ran out, so they allow minutes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest

from helpers import PYTHON, REPO, failed_launch_report, rank_logs
from patience import Patience, communicate

STEPS, CKPT_EVERY, KILL_AFTER = 24, 4, 4
TRAIN = ["train", "tiny-test", f"steps={STEPS}", f"ckpt_every={CKPT_EVERY}", "log_every=1", "eval_every=0",
         "data.max_files=20"]


def torchrun(out_dir: Path, max_restarts: int, logs: Path) -> subprocess.Popen:
    """``--standalone``: the rendezvous store binds a port of its own choosing (a port picked and released here
    could be taken before torchrun binds it); each rank's output in files under ``logs`` (kept on failure)."""
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           f"--max-restarts={max_restarts}", "--monitor-interval=0.2", f"--log-dir={logs}", "--redirects=3",
           "-m", "meshwright.cli", *TRAIN, f"out_dir={out_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    for k in ("TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # its own process group: a timeout kills the workers too


def worker_with_rank(agent: psutil.Process, rank: str) -> psutil.Process | None:
    for child in agent.children(recursive=True):
        try:
            if child.environ().get("RANK") == rank and child.environ().get("TORCHELASTIC_RESTART_COUNT") == "0":
                return child
        except psutil.Error:
            continue
    return None


def losses(out_dir: Path) -> dict[int, float]:
    recs = [json.loads(line) for line in (out_dir / "log.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in recs}


def finish(proc: subprocess.Popen, timeout: float, logs: Path) -> str:
    """torchrun's output followed by every rank's (all attempts); a failure or timeout reports the failing rank's
    stderr whole (helpers.failed_launch_report)."""
    try:
        out, _ = communicate(proc, timeout)  # quiet-box seconds, stretched by the load
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        pytest.fail(failed_launch_report(f"torchrun timed out after {timeout} s", logs, "", out))
    if proc.returncode != 0:
        pytest.fail(failed_launch_report(f"torchrun failed (rc={proc.returncode})", logs, "", out))
    return out + "".join(v["stdout"] + v["stderr"] for _, v in sorted(rank_logs(logs).items()))


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)


@pytest.mark.timeout(900)
def test_sigkill_rank_restarts_and_resumes_identical_losses(tmp_path):
    killed_dir, ref_dir = tmp_path / "killed", tmp_path / "ref"
    ref = torchrun(ref_dir, max_restarts=0, logs=tmp_path / "ref-logs")  # the uninterrupted run, side by side
    proc = torchrun(killed_dir, max_restarts=1, logs=tmp_path / "killed-logs")
    try:
        agent = psutil.Process(proc.pid)
        ckpt = killed_dir / "ckpt" / f"step_{KILL_AFTER:06d}" / "trainer_state.json"
        patience = Patience(300)
        victim = None
        while not patience.expired() and proc.poll() is None:
            if ckpt.is_file():
                victim = worker_with_rank(agent, "1")
                if victim is not None:
                    victim.send_signal(signal.SIGKILL)  # mid-run: the next checkpoint is steps away
                    break
            time.sleep(0.02)
        assert victim is not None, "never saw the checkpoint and a rank-1 worker to kill"
        out = finish(proc, timeout=420, logs=tmp_path / "killed-logs")
        finish(ref, timeout=120, logs=tmp_path / "ref-logs")
    finally:
        stop(proc)
        stop(ref)
    summary = json.loads((killed_dir / "summary.json").read_text())
    assert summary["resumed"] is True and summary["steps"] == STEPS
    assert KILL_AFTER <= STEPS - summary["steps_this_run"] < STEPS, summary  # lost at most the steps since a ckpt
    # torchrun saw the failure and restarted. The rank it names is the first it found ended: the SIGKILLed rank 1, or,
    # when one poll finds both ended, rank 0, which stops at once with its one-line peer-lost error (exit 1)
    assert "failed (exitcode: " in out, out[-6000:]
    assert ("exitcode: -9" in out and "local_rank: 1" in out) or "a peer rank was lost" in out, out[-6000:]
    ref_losses, got = losses(ref_dir), losses(killed_dir)
    assert sorted(got) == list(range(1, STEPS + 1)) == sorted(ref_losses)
    for step in ref_losses:
        assert abs(got[step] - ref_losses[step]) <= 1e-6, (step, got[step], ref_losses[step])
