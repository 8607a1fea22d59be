"""The prepared GPU check of meshwright's precision policy against FSDP2 mixed precision runs on CPU at tiny sizes:
each policy trains what it names, from the same weights and tokens, and the planner's prediction sits beside it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

import bench_precision_policy as bpp  # noqa: E402

TINY = argparse.Namespace(cpu_smoke=True, layers=1, seq=16, accum=2, steps=1, warmup=1, timeout=60.0)


@pytest.mark.timeout(120)
def test_each_policy_trains_what_it_names_from_the_same_start():
    runs = {name: bpp.run_one(name, TINY) for name in bpp.POLICIES}
    assert runs["autocast"]["stored"] == "float32 Parameter"  # fp32 master weights, autocast casts per microbatch
    assert runs["fsdp_mixed"]["stored"].startswith("float32") and "DTensor" in runs["fsdp_mixed"]["stored"]
    assert runs["fsdp_mixed_nosync"]["stored"] == runs["fsdp_mixed"]["stored"]
    assert runs["bf16_master"]["stored"] == "bfloat16 Parameter"
    first = runs["autocast"]["loss_first"]
    for r in runs.values():  # same weights and tokens: the first loss differs only by bf16 rounding
        assert abs(r["loss_first"] - first) < 0.02 and r["loss_last"] < r["loss_first"] + 0.5
        assert r["tokens_per_s"] > 0 and r["params"] == runs["autocast"]["params"]


def test_predictions_isolate_the_precision_terms_and_the_table_has_a_row_per_policy():
    args = argparse.Namespace(cpu_smoke=False, layers=2, seq=4096, accum=8)
    pred = bpp.predictions(args, "dgx-h100-80g")
    auto, fsdp = pred["autocast"], pred["fsdp_mixed"]
    assert (auto["stack"], auto["precision"], fsdp["stack"], fsdp["precision"]) == (
        "meshwright", "autocast", "torchtitan", "fsdp_mixed")
    assert auto["rules_step_s"] == auto["step_s"]  # meshwright's rules are autocast's own
    # both pay a weight cast per forward and 6 B per weight more per backward (autocast: the gradient's up-cast;
    # FSDP2 on its one-rank mesh: the re-gather's cast after reshard_after_forward) and the fp32 accumulation per
    # microbatch: the same step under the same rules; fsdp_mixed keeps no bf16 weight copy through backward
    assert fsdp["rules_step_s"] == pytest.approx(auto["rules_step_s"]) and fsdp["memory_gib"] < auto["memory_gib"]
    measured = {"autocast": {"step_s": 2.0, "tokens_per_s": 1.0, "loss_first": 10.0, "loss_last": 9.0,
                             "peak_reserved_gib": 40.0},
                "fsdp_mixed": {"step_s": 1.5, "tokens_per_s": 1.0, "loss_first": 10.0, "loss_last": 9.0,
                               "peak_reserved_gib": 30.0},
                "bf16_master": {"policy": "bf16_master", "error": "CUDA out of memory"}}
    table = bpp.markdown({"date_utc": "d", "device": "NVIDIA H100", "torch": "t", "model": "m", "seq": 4096,
                          "accum": 8, "policies": list(measured), "measured": measured, "predicted": pred})
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| policy")]
    assert [r.split(" | ")[0] for r in rows] == ["| autocast", "| fsdp_mixed", "| bf16_master"]
    assert "| 0.750 |" in rows[1] and "| 40.00 |" in rows[0] and "error: CUDA out of memory" in rows[2]


def test_bad_policies_are_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        bpp.main(["--cpu-smoke", "--policies", "autocast,fp8"])
    assert "--policies='autocast,fp8' is invalid: a comma-separated subset of autocast" in capsys.readouterr().err


@pytest.mark.timeout(120)
def test_the_fsdp_policy_lets_go_of_its_group_before_the_group_goes(monkeypatch):
    """``run_one`` tears down through parallel/teardown.py (as bench_moe.py): when the group is destroyed no FSDP2
    module or DeviceMesh of the run is left holding it (it used to call ``dist.destroy_process_group`` itself, with
    the step's closure -- the FSDP2 model and its mesh -- still alive)."""
    import gc

    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule

    import meshwright.parallel.teardown as teardown

    seen: list[tuple[int, int]] = []
    real = teardown.destroy_process_group

    def destroy() -> None:
        gc.collect()
        objs = gc.get_objects()
        seen.append((sum(isinstance(o, FSDPModule) for o in objs), sum(isinstance(o, DeviceMesh) for o in objs)))
        real()

    monkeypatch.setattr(teardown, "destroy_process_group", destroy)
    run = bpp.run_one("fsdp_mixed", TINY)
    assert "DTensor" in run["stored"] and seen == [(0, 0)]


def test_no_benchmark_destroys_the_process_group_itself():
    """Every benchmark lets go of the default process group through parallel/teardown.py (close_all/shutdown/
    destroy_process_group), whose order avoids the gloo teardown deadlock: none calls torch's destroy of the default
    group directly. (Destroying a subgroup it made, ``dist.destroy_process_group(g)``, is another operation:
    benchmarks/idle_gloo_groups.py measures exactly that.)"""
    import re

    root = Path(__file__).resolve().parents[2] / "benchmarks"
    default = re.compile(r"dist\.destroy_process_group\(\s*\)")
    direct = sorted(f.name for f in root.glob("*.py") if default.search(f.read_text()))
    assert direct == []
