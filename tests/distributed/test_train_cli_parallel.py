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


@pytest.mark.timeout(400)
def test_torchrun_train_plan_auto_profiles_once_then_reuses(tmp_path) -> None:
    """`--plan auto` on 2 ranks: the first run profiles collectively (hardware + model incl. the runtime's
    TP/ZeRO blocks) and plans with it; a second run finds the cache and skips profiling."""
    import os

    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "MESHWRIGHT_CACHE_DIR": str(cache)}
    outs = []
    for attempt in range(2):
        out = tmp_path / f"run{attempt}"
        cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", f"--master-port={free_port()}",
               "-m", "meshwright.cli", "train", "configs/train/tiny-test.yaml", f"out_dir={out}", "steps=2",
               "eval_every=0", "log_every=1", "--plan", "auto"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=360, cwd=REPO, env=env)
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "plan auto: calibrated with profiles of 2 rank(s)" in proc.stdout
        outs.append(out)
        if attempt == 0:
            files = sorted(p.name for p in cache.iterdir())
            mtimes = {p.name: p.stat().st_mtime_ns for p in cache.iterdir()}
    assert len(files) == 2 and any(f.startswith("hardware-w2-") for f in files) and any(f.startswith("model-w2-") for f in files)
    assert {p.name: p.stat().st_mtime_ns for p in cache.iterdir()} == mtimes  # reused, not re-profiled
    prof = json.loads(next(cache.glob("model-w2-*.json")).read_text())
    assert {(e["tp"], e["sp"], e["zero"]) for e in prof["runtime_overheads"]} >= {(2, False, 0), (1, False, 2)}
    for out in outs:
        summary = json.loads((out / "summary.json").read_text())
        assert summary["world_size"] == 2 and math.isfinite(summary["final_loss"])
