"""WTA-CRS under tp=2 (DTensor Colwise/Rowwise) and DDP on 2 gloo ranks: one torchrun launch."""

from __future__ import annotations

from pathlib import Path

from helpers import read_json, run_torchrun

WORKER = Path(__file__).with_name("wta_crs_tp_worker.py")


def test_wta_crs_tp2_same_rows_and_ddp_parity(tmp_path):
    out = tmp_path / "report.json"
    run_torchrun(WORKER, 2, [str(out)], timeout=240)
    report = read_json(out)
    assert report["ok"] and report["tp_ok"] and report["ddp_ok"]
    assert report["tp_no_grad_kwarg_ok"]  # the torch 2.11 path (from_local without grad_placements=) agrees too
    assert report["tp_no_grad_kwarg_step1_w2_rows"] == int(0.3 * 60)
    assert report["tp_step1_w1_rows"] == int(0.3 * 60) and report["tp_step1_w2_rows"] == int(0.3 * 60)
