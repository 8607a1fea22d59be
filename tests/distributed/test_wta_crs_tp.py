"""WTA-CRS under tp=2 (DTensor Colwise/Rowwise) and DDP on 2 gloo ranks (wta_crs_tp_worker.py, in the shared worker
launch: conftest.worker_launch)."""

from __future__ import annotations

import pytest

from helpers import read_json
from worker_launch import case_dir, wta_crs_tp


@pytest.mark.timeout(1400)  # the shared worker launch (conftest.worker_launch) may run in this test's setup
def test_wta_crs_tp2_same_rows_and_ddp_parity(worker_launch):
    report = read_json(case_dir(worker_launch, wta_crs_tp) / "report.json")
    assert report["ok"] and report["tp_ok"] and report["ddp_ok"]
    assert report["tp_no_grad_kwarg_ok"]  # the torch 2.11 path (from_local without grad_placements=) agrees too
    assert report["tp_no_grad_kwarg_step1_w2_rows"] == int(0.3 * 60)
    assert report["tp_step1_w1_rows"] == int(0.3 * 60) and report["tp_step1_w2_rows"] == int(0.3 * 60)
