"""CoatAdamW with FSDP2-sharded parameters and a DCP resume on 2 gloo ranks (coat_fsdp_worker.py, in the shared worker
launch: conftest.worker_launch)."""

from __future__ import annotations

import pytest

from helpers import read_json
from worker_launch import case_dir, coat


@pytest.mark.timeout(1400)  # the shared worker launch (conftest.worker_launch) may run in this test's setup
def test_coat_fsdp2_parity_and_dcp_resume(worker_launch):
    res = read_json(case_dir(worker_launch, coat) / "coat.json")
    # One-process CoatAdamW on the whole batch vs FSDP2 on two halves: the same to within FP8 rounding
    # flips (reduction order, per-shard groups of the 1-D norm weights), far below one step (lr=1e-3).
    assert res["loss_err"] < 1e-4, res
    assert res["param_err"] < 3e-4, res
    assert res["param_drift"] < 5e-3, res  # no m/eps blow-up: 3 steps of lr 1e-3
    assert res["moment_dtypes"] == ["torch.float8_e4m3fn", "torch.float8_e4m3fn"]
    assert 2.18 < res["state_bytes_per_param"] < 2.2
    assert res["dcp_resume_bitwise"] is True
    assert res["dcp_resume_bitwise_fp32_states"] is True
