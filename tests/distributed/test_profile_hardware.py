"""`meshwright profile hardware` and `profile model` under torchrun (2 gloo ranks): collectives, p2p and overlap are
measured, and the runtime's layouts timed. Both commands run in one launch (tests/distributed/cli_runs.py), each with
a process group of its own, after the runs of other modules (conftest.cli_launch, cli_launch.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import read_json

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def profiles(cli_launch) -> tuple[Path, Path]:
    """Runs 9-10 of the 2-rank launch this module shares with others (conftest.cli_launch, cli_launch.py)."""
    _, tmp = cli_launch
    return tmp / "hw.json", tmp / "model.json"


@pytest.mark.timeout(1200)
def test_profile_hardware_two_ranks(profiles):
    out, _ = profiles
    from meshwright.launcher.profiling.hardware import load_hardware_profile

    prof = load_hardware_profile(out)
    assert prof["world_size"] == 2
    ops = {(c["op"], c["group_size"], c["stride"]) for c in prof["collectives"]}
    assert ops == {(op, 2, 1) for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")}
    for c in prof["collectives"]:
        assert c["busbw_gbps"] > 0 and c["latency_us"] >= 0 and c["scope"] == "intra"
    assert prof["p2p"]["bw_gbps"] > 0
    assert 0.0 <= prof["overlap"]["slowdown"] <= 1.0
    d = prof["derived"]
    assert d["measured"] == ["intra"] and d["intra_bw_gbps"] > 0 and d["contention"] >= 1.0
    assert all(m["concurrent"] and m["solo_seconds"] > 0 for m in prof["matmul"])
    assert read_json(out)["version"] == 1


@pytest.mark.timeout(1200)
def test_profile_model_two_ranks_times_the_runtime_layouts(profiles):
    """Under torchrun the model profile also times the runtime's TP/SP and ZeRO-2/3 blocks, and the
    planner turns them into per-layer overheads that make tp layouts slower than the bare model says."""
    _, out = profiles
    from meshwright.config import load_cluster, load_model_config
    from meshwright.launcher.planner import cost_model as cm
    from meshwright.launcher.profiling.model import apply_model_profile, load_model_profile

    prof = load_model_profile(out)
    assert prof["world_size"] == 2
    layouts = {(e["tp"], e["sp"], e["zero"]) for e in prof["runtime_overheads"]}
    assert layouts == {(2, False, 0), (2, True, 0), (1, False, 2), (1, False, 3)}
    for e in prof["runtime_overheads"]:
        assert len(e["points"]) == 4 and all(p["runtime_s"] > 0 and p["plain_s"] > 0 and p["comm_s"] > 0 for p in e["points"])
    cfg = load_model_config("tiny")
    hw = apply_model_profile(cm.hardware_from_cluster(load_cluster("local-cpu")), prof, cfg)
    assert {k for k, _, _ in hw.strategy_overheads} == {"tp2", "tp2sp", "zero2", "zero3"}
    # DTensor dispatch on CPU costs more than the two shards' matmuls save: tp2 is slower than its shard
    e = next(x for x in prof["runtime_overheads"] if (x["tp"], x["sp"]) == (2, False))
    assert sum(p["runtime_s"] for p in e["points"]) > sum(p["plain_s"] for p in e["points"])
