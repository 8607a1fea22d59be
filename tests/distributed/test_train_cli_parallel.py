"""End to end: `torchrun -m meshwright.cli train ... --plan` with a layer-wise + pipeline-free plan on 2 ranks."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from helpers import PYTHON, REPO, free_port


@pytest.mark.timeout(400)
def test_torchrun_train_with_layerwise_plan(tmp_path) -> None:
    out = tmp_path / "run"
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--master-port={free_port()}",
           "-m", "meshwright.cli", "train", "configs/train/tiny-test.yaml", f"out_dir={out}", "steps=4",
           "warmup_steps=1", "eval_every=2", "log_every=1", "--plan", "configs/plans/tiny-layerwise.yaml"]
    env = {"OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    import os

    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, cwd=REPO, env={**os.environ, **env})
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp_size"] == 2
    assert math.isfinite(summary["final_loss"])
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)
