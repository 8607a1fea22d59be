"""End to end: `torchrun -m meshwright.cli train ... --plan` with a layer-wise + pipeline-free plan on 2 ranks, and
`--plan auto` twice (profiled once, then reused). The three runs share one launch (tests/distributed/cli_runs.py),
each with a process group of its own, with the runs of other modules after them (conftest.cli_launch, cli_launch.py)."""

from __future__ import annotations

import json
import math
import re

import pytest


@pytest.fixture(scope="module")
def launch(cli_launch) -> tuple[str, object]:
    """Runs 0-2 of the 2-rank launch this module shares with others (conftest.cli_launch, cli_launch.py)."""
    return cli_launch


@pytest.mark.timeout(1200)
def test_torchrun_train_with_layerwise_plan(launch) -> None:
    _, tmp = launch
    out = tmp / "layerwise"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["dp_size"] == 2
    assert math.isfinite(summary["final_loss"])
    steps = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert steps and all(math.isfinite(s["loss"]) for s in steps)


@pytest.mark.timeout(1200)
def test_torchrun_train_plan_auto_profiles_once_then_reuses(launch) -> None:
    """`--plan auto` on 2 ranks: the first run profiles collectively (hardware + model incl. the runtime's
    TP/ZeRO blocks) and plans with it; a second run finds the cache and skips profiling: no cache file is
    written after the first run ended (its end: the cli_runs line rank 0 printed)."""
    stdout, tmp = launch
    cache = tmp / "cache"
    assert stdout.count("plan auto: calibrated with profiles of 2 rank(s)") == 2, stdout[-4000:]
    first_ended = int(re.search(r"cli_runs: rank 0 run 1 exit 0 at (\d+)", stdout).group(1))
    files = sorted(p.name for p in cache.iterdir())
    assert len(files) == 2 and any(f.startswith("hardware-w2-") for f in files) and any(f.startswith("model-w2-") for f in files)
    assert all(p.stat().st_mtime_ns < first_ended for p in cache.iterdir())  # reused, not re-profiled
    prof = json.loads(next(cache.glob("model-w2-*.json")).read_text())
    assert {(e["tp"], e["sp"], e["zero"]) for e in prof["runtime_overheads"]} >= {(2, False, 0), (1, False, 2)}
    for attempt in range(2):
        summary = json.loads((tmp / f"auto{attempt}" / "summary.json").read_text())
        assert summary["world_size"] == 2 and math.isfinite(summary["final_loss"])
