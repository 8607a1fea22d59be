"""Mid-run checkpoints under expert parallelism and megatron TP: saving at step 3 must leave the live
optimizer state alone, so steps 4.. run and a resume from step 3 replays them bit for bit (#19 item 4:
the shard hooks wrote DTensors into the state the optimizer shares with ``state_dict()``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from helpers import PYTHON, REPO, free_port

CASES = {
    "moe-ep2": ["model=tiny-moe", "--plan", "configs/plans/tiny-moe-ep2.yaml"],
    "tp2-megatron": ["tp_backend=megatron", "--plan", "{tmp}/tp2.yaml"],
}
TP2_NO_SP = "version: 1\nmodel: tiny\nseq_len: 64\nglobal_batch: 8\nmicro_batch: 4\nlayers:\n  - {tp: 2, dp: 1, repeat: 4}\n"


def torchrun(out, extra, *flags):
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "meshwright.cli", "train", "configs/train/tiny-test.yaml", f"out_dir={out}", "steps=5", "warmup_steps=1",
           "eval_every=0", "log_every=1", "ckpt_every=3", "energy=false", "data.max_files=20", *extra, *flags]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert proc.returncode == 0, proc.stderr[-4000:]


def losses(out):
    return {r["step"]: r["loss"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines())}


@pytest.mark.timeout(700)
@pytest.mark.parametrize("case", sorted(CASES))
def test_midrun_checkpoint_then_resume_is_exact(tmp_path, case):
    out = tmp_path / "run"
    (tmp_path / "tp2.yaml").write_text(TP2_NO_SP)  # megatron TP has no sequence parallelism
    extra = [a.format(tmp=tmp_path) for a in CASES[case]]
    torchrun(out, extra)
    straight = losses(out)
    assert sorted(straight) == [1, 2, 3, 4, 5]  # steps after the step-3 checkpoint ran
    shutil.rmtree(out / "ckpt" / "step_000005")
    (out / "ckpt" / "latest").write_text("step_000003\n")
    torchrun(out, extra, "--resume")
    resumed = losses(out)
    assert [resumed[s] for s in (4, 5)] == [straight[s] for s in (4, 5)]
