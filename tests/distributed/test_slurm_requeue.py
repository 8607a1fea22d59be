"""configs/slurm/train.sbatch, the Slurm example of docs/launch.md, run by bash as sbatch starts it, with stand-ins
for srun (runs its command as the one task: a signal to srun reaches it) and scontrol (names this host, records a
requeue). SIGUSR1 to the script (Slurm's ``--signal=B:USR1@N``) reaches both ranks through srun and torchrun
(``--signals-to-handle``); they stop after the same step with a checkpoint there, and the script requeues the job.
Before, torchrun took no SIGUSR1: it died alone and its ranks trained on until Slurm's SIGKILL. One launch."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess

import pytest

from helpers import PYTHON, REPO, address_in_use, children, free_port
from patience import Patience, scaled_env_s
from meshwright.train.checkpoint import latest_checkpoint
from meshwright.train.checkpoint_io import verify_manifest

SCRIPT = REPO / "configs" / "slurm" / "train.sbatch"


@pytest.mark.timeout(300)
def test_sbatch_example_passes_sigusr1_to_every_rank_and_requeues(tmp_path):
    stubs = tmp_path / "bin"
    stubs.mkdir()
    (stubs / "srun").write_text('#!/bin/sh\nwhile [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n')
    (stubs / "scontrol").write_text(f'#!/bin/sh\ncase "$1" in show) echo 127.0.0.1;; '
                                    f'requeue) echo "$2" >> {tmp_path}/requeued;; esac\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out, steps = tmp_path / "run", 400
    env = {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "n0", "SLURM_NNODES": "1",
           "SLURM_NODEID": "0", "SLURM_JOB_ID": "42", "OUT_DIR": str(out), "CONFIG": "tiny-test", "GPUS": "2",
           "GRACE": "0", "PYTHON": PYTHON, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PYTHONUNBUFFERED": "1", "MESHWRIGHT_CACHE": str(tmp_path / "cache"),
           # quiet-box bounds stretched by the box's load (tests/patience.py): the gloo timeout, and torchrun's wait
           # for its ranks' stop (the script's own default with GRACE=0 is 30 s) before it SIGKILLs them
           "MESHWRIGHT_PG_TIMEOUT_S": scaled_env_s(60), "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": scaled_env_s(30)}
    env.pop("TORCHELASTIC_RUN_ID", None)
    log = tmp_path / "job.out"
    records = out / "log.jsonl"

    def stop_job(job: subprocess.Popen, ranks: list[int]) -> None:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)  # the session this test started: the script and torchrun
            job.wait(10)
        for pid in ranks:  # in sessions of their own (torchrun's): a torchrun killed by SIGUSR1 left them running
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    job: subprocess.Popen | None = None
    ranks: list[int] = []
    try:
        for attempt in (1, 2):  # the static rendezvous' port, released by free_port(), may be taken before it is bound
            with open(log, "w") as fh:
                job = subprocess.Popen(["bash", str(SCRIPT), f"steps={steps}", "log_every=1", "eval_every=0",
                                        "data.max_files=20", "progress=false"], stdout=fh, stderr=subprocess.STDOUT,
                                       cwd=REPO, env={**env, "PORT": str(free_port())}, start_new_session=True)
            patience = Patience(200)
            patience.until(lambda: job.poll() is not None
                           or (records.is_file() and len(records.read_text().splitlines()) >= 2), 0.1)
            if not (job.poll() is not None and attempt == 1 and address_in_use(log.read_text())):
                break
        assert job.poll() is None and records.is_file() and len(records.read_text().splitlines()) >= 2, \
            f"2 steps not logged after {patience.waited()}:\n{log.read_text()[-4000:]}"
        ranks = [r for agent in children(job.pid) for r in children(agent)]  # the script's torchrun's
        assert len(ranks) == 2, log.read_text()[-4000:]
        job.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@N does GRACE seconds before the time limit
        patience = Patience(60)
        assert patience.until(lambda: job.poll() is not None), \
            f"the job not ended after {patience.waited()}:\n{log.read_text()[-4000:]}"
        rc = job.returncode
    finally:
        if job is not None:
            stop_job(job, ranks)
    text = log.read_text()
    summary = json.loads((out / "summary.json").read_text())
    stopped = summary["steps"]
    assert summary["stopped_by"] == "SIGUSR1" and summary["world_size"] == 2 and 2 <= stopped < steps, text[-4000:]
    assert text.count(f"stopped at step {stopped} of {steps}: SIGUSR1 received; checkpoint saved") == 1, text[-4000:]
    ckpt = latest_checkpoint(out / "ckpt")
    assert ckpt is not None and ckpt.name == f"step_{stopped:06d}" and (ckpt / "rng_rank00001.pt").is_file()
    verify_manifest(ckpt)
    assert (tmp_path / "requeued").read_text() == "42\n", text[-4000:]
    assert "requeueing job 42" in text
    # torchrun ends 1 (its SignalException) after passing a signal on, whatever its ranks' 143: the script decides
    # the requeue from the signal it received, not from that status
    assert rc == 1, (rc, text[-4000:])
