"""`meshwright profile hardware` under torchrun (2 gloo ranks): collectives, p2p and overlap are measured."""

from __future__ import annotations

import pytest

from helpers import REPO, read_json, run_torchrun

pytestmark = pytest.mark.distributed


def test_profile_hardware_two_ranks(tmp_path):
    out = tmp_path / "hw.json"
    run_torchrun(REPO / "meshwright" / "cli.py", 2,
                 ["profile", "hardware", "--sizes", "64,128", "--iters", "2", "--timeout-s", "60", "--out", str(out)],
                 timeout=180)
    from meshwright.launcher.hardware_profile import load_hardware_profile

    prof = load_hardware_profile(out)
    assert prof["world_size"] == 2
    ops = {(c["op"], c["group_size"], c["stride"]) for c in prof["collectives"]}
    assert ops == {(op, 2, 1) for op in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all")}
    for c in prof["collectives"]:
        assert c["busbw_gbps"] > 0 and c["latency_us"] >= 0 and c["scope"] == "intra"
    assert prof["p2p"]["bw_gbps"] > 0
    assert 0.0 <= prof["overlap"]["slowdown"] <= 1.0
    d = prof["derived"]
    assert d["measured"] == ["intra"] and d["intra_bw_gbps"] > 0
    assert read_json(out)["version"] == 1
